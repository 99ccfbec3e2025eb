//! `kill -9` of real processes: three `raft-demo` replicas on 127.0.0.1
//! take concurrent appends; the leader is SIGKILLed mid-load, then all three
//! at once; every append that was acknowledged must still be in every
//! replica's log, at the index it was acknowledged with.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::grpc_status::leader_hint;
use consensus::testkit::Applied;
use parking_lot::Mutex;
use proto::demo::v1::replicated_log_client::ReplicatedLogClient;
use proto::demo::v1::{AppendRequest, ReadRequest, StatusRequest};
use tonic::transport::Channel;

struct Cluster {
    dir: tempfile::TempDir,
    addrs: HashMap<u64, String>,
    procs: HashMap<u64, Child>,
}

impl Cluster {
    fn start(&mut self, id: u64) {
        let peers: Vec<String> = self.addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let child = Command::new(env!("CARGO_BIN_EXE_raft-demo"))
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &self.addrs[&id]])
            .args(["--peers", &peers.join(",")])
            .args([
                "--data-dir",
                &self.dir.path().join(format!("n{id}")).to_string_lossy(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn raft-demo");
        self.procs.insert(id, child);
    }

    /// SIGKILL: no flush, no shutdown path.
    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn client(addr: &str) -> Option<ReplicatedLogClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(6))
        .connect()
        .await
        .ok()?;
    Some(ReplicatedLogClient::new(ch))
}

/// Appends through whichever replica leads, following hints; gives up
/// after `within`. Returns the committed index.
async fn append(addrs: &HashMap<u64, String>, data: Vec<u8>, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    let mut ids: Vec<u64> = addrs.keys().copied().collect();
    ids.sort_unstable();
    let mut target = ids[0];
    while Instant::now() < deadline {
        if let Some(mut c) = client(&addrs[&target]).await {
            match c.append(AppendRequest { data: data.clone() }).await {
                Ok(r) => return Some(r.into_inner().index),
                Err(st) => {
                    if let Some(h) = leader_hint(&st).filter(|h| h.leader_id != 0) {
                        target = h.leader_id;
                        continue;
                    }
                    // DEADLINE_EXCEEDED means "maybe applied": we do not
                    // count it as acknowledged, and do not retry it either
                    // (a retry could apply it twice).
                    if st.code() == tonic::Code::DeadlineExceeded {
                        return None;
                    }
                }
            }
        }
        target = ids[(ids.iter().position(|&i| i == target).unwrap() + 1) % ids.len()];
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn leader(addrs: &HashMap<u64, String>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (id, a) in addrs {
            if let Some(mut c) = client(a).await {
                if let Ok(s) = c.status(StatusRequest {}).await {
                    let g = s.into_inner().group.unwrap();
                    if g.leader_id == *id {
                        return *id;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_all(addr: &str) -> Vec<(u64, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(mut c) = client(addr).await {
            if let Ok(r) = c.read(ReadRequest { from_index: 0 }).await {
                return r
                    .into_inner()
                    .records
                    .into_iter()
                    .map(|r| (r.index, r.data))
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "cannot read from {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_append() {
    // The processes bind these ports themselves once the listeners close.
    let (listeners, addrs) = consensus::testkit::bind_local(3).await.unwrap();
    drop(listeners);
    let mut cluster = Cluster {
        dir: tempfile::tempdir().unwrap(),
        addrs: addrs.clone(),
        procs: HashMap::new(),
    };
    for id in 1..=3 {
        cluster.start(id);
    }
    leader(&addrs).await;

    let acked: Arc<Mutex<Vec<Applied>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (addrs, acked, stop) = (addrs.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                // Bounded: at most 5000 appends per writer.
                for i in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let data = format!("w{w}-{i}").into_bytes();
                    if let Some(index) = append(&addrs, data.clone(), Duration::from_secs(10)).await
                    {
                        acked.lock().push((index, data));
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(800)).await;
    let l = leader(&addrs).await;
    cluster.kill9(l);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.start(l);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_all = acked.lock().len();
    // Every replica at once.
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.start(id);
    }
    leader(&addrs).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().clone();
    assert!(before_all > 20, "load ran before the crashes: {before_all}");
    assert!(acked.len() > before_all, "writes resumed after the crashes");
    let logs: Vec<Vec<(u64, Vec<u8>)>> = {
        let mut v = Vec::new();
        for id in 1..=3 {
            v.push(read_all(&addrs[&id]).await);
        }
        v
    };
    // Writes stopped, and reads are linearizable: every replica answers
    // the same log.
    for l in &logs[1..] {
        assert_eq!(l, &logs[0], "replicas diverged");
    }
    let by_index: HashMap<u64, &Vec<u8>> = logs[0].iter().map(|(i, d)| (*i, d)).collect();
    for (index, data) in &acked {
        assert_eq!(
            by_index.get(index).copied(),
            Some(data),
            "acknowledged append {} at {index} lost",
            String::from_utf8_lossy(data)
        );
    }
}
