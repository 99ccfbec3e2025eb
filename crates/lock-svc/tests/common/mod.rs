//! The in-process three-replica lock-svc cluster the integration tests
//! share: real gRPC servers on 127.0.0.1, one fault switchboard.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::testkit::{bind_local, Faults};
use dsync_client::LockClient;
use lock_svc::{LockConfig, LockServer};
use proto::lock::v1::lock_service_client::LockServiceClient;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: HashMap<u64, String>,
    pub servers: HashMap<u64, LockServer>,
    pub faults: Arc<Faults>,
    /// Replicas started as a build without session leases in memory
    /// would be (they do not report the feature).
    pub without_leases: std::collections::HashSet<u64>,
}

impl Cluster {
    pub async fn start() -> Self {
        let (listeners, addrs) = bind_local(3).await.unwrap();
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            addrs,
            servers: HashMap::new(),
            faults: Faults::new(),
            without_leases: Default::default(),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.start_on(i as u64 + 1, l);
        }
        c
    }

    pub fn start_on(&mut self, id: u64, l: tokio::net::TcpListener) {
        let mut cfg = LockConfig::new(
            id,
            self.addrs.clone(),
            self.dir.path().join(format!("n{id}")),
        );
        cfg.tick_interval = Duration::from_millis(100);
        cfg.replica.faults = Some(self.faults.clone());
        if self.without_leases.contains(&id) {
            cfg.replica.features.clear();
        }
        self.servers.insert(id, LockServer::start(cfg, l).unwrap());
    }

    pub async fn restart(&mut self, id: u64) {
        let l = tokio::net::TcpListener::bind(&self.addrs[&id])
            .await
            .unwrap();
        self.start_on(id, l);
    }

    pub async fn kill(&mut self, id: u64) {
        if let Some(s) = self.servers.remove(&id) {
            s.kill().await;
        }
    }

    pub async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leaders: Vec<u64> = self
                .servers
                .iter()
                .filter(|(_, s)| s.locks.group.status().is_leader())
                .map(|(id, _)| *id)
                .collect();
            if leaders.len() == 1 {
                return leaders[0];
            }
            assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running replica applied `EnableLeases`.
    pub async fn leases_on(&self) {
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let on = self
                    .servers
                    .values()
                    .all(|s| s.locks.state.read().leases_in_memory);
                ok_if(on, "leases never enabled")
            },
        )
        .await;
    }

    pub fn endpoints(&self) -> Vec<String> {
        let mut ids: Vec<&u64> = self.addrs.keys().collect();
        ids.sort();
        ids.into_iter().map(|i| self.addrs[i].clone()).collect()
    }

    pub fn client(&self) -> LockClient {
        LockClient::connect(self.endpoints()).unwrap()
    }

    pub async fn raw(&self, id: u64) -> LockServiceClient<tonic::transport::Channel> {
        LockServiceClient::connect(format!("http://{}", self.addrs[&id]))
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        for id in [1, 2, 3] {
            self.kill(id).await;
        }
    }
}

/// Polls `check` every `every` until it answers Ok; panics with its last
/// complaint once `within` has passed. The tests' one bounded wait.
pub async fn eventually<F, Fut>(within: Duration, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Ok when `done`, else `why`: an [`eventually`] check's answer.
pub fn ok_if(done: bool, why: impl Into<String>) -> Result<(), String> {
    if done {
        Ok(())
    } else {
        Err(why.into())
    }
}
