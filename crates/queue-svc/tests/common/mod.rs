//! The in-process three-replica queue-svc cluster the integration tests
//! share: real gRPC servers on 127.0.0.1.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use consensus::testkit::bind_local;
use proto::queue::v1 as pb;
use proto::queue::v1::queue_service_client::QueueServiceClient;
use queue_svc::server::{QueueConfig, QueueServer};
use tonic::transport::Channel;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: HashMap<u64, String>,
    pub servers: HashMap<u64, QueueServer>,
    pub faults: std::sync::Arc<consensus::testkit::Faults>,
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_n(3).await
    }

    pub async fn start_n(n: usize) -> Self {
        let (listeners, addrs) = bind_local(n).await.unwrap();
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            addrs,
            servers: HashMap::new(),
            faults: consensus::testkit::Faults::new(),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.start_on(i as u64 + 1, l);
        }
        c
    }

    pub fn start_on(&mut self, id: u64, l: tokio::net::TcpListener) {
        let mut cfg = QueueConfig::new(
            id,
            self.addrs.clone(),
            self.dir.path().join(format!("n{id}")),
        );
        cfg.replica.faults = Some(self.faults.clone());
        self.servers.insert(id, QueueServer::start(cfg, l).unwrap());
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

    pub async fn client(&self, addr: &str) -> QueueServiceClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        QueueServiceClient::new(ch)
    }

    /// Calls `f` on some replica, following leader hints and waiting out
    /// elections, within 20 s.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(QueueServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut live: Vec<String> = self
            .servers
            .keys()
            .map(|id| self.addrs[id].clone())
            .collect();
        live.sort();
        let mut addr = live[0].clone();
        let mut i = 0;
        loop {
            match f(self.client(&addr).await).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    match proto::leader_hint(&s) {
                        Some(h) if !h.leader_addr.is_empty() && live.contains(&h.leader_addr) => {
                            addr = h.leader_addr;
                        }
                        _ => {
                            i += 1;
                            addr = live[i % live.len()].clone();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Receives from every replica until `want` messages came or 20 s
    /// passed; acks them. Returns (message id → payload, times seen).
    pub async fn drain(
        &self,
        topic: &str,
        group: &str,
        want: usize,
    ) -> BTreeMap<String, (Vec<u8>, u32)> {
        let mut seen: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < want && Instant::now() < deadline {
            for id in self.servers.keys() {
                let mut c = self.client(&self.addrs[id]).await;
                let r = c
                    .receive(pb::ReceiveRequest {
                        topic: topic.into(),
                        group: group.into(),
                        consumer: format!("c{id}"),
                        max_messages: 100,
                        wait_ms: 100,
                        ..Default::default()
                    })
                    .await;
                let Ok(r) = r else { continue };
                let msgs = r.into_inner().messages;
                if msgs.is_empty() {
                    continue;
                }
                let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
                for m in msgs {
                    let e = seen
                        .entry(m.message_id.clone())
                        .or_insert((m.payload.clone(), 0));
                    assert_eq!(e.0, m.payload, "payload of {} changed", m.message_id);
                    e.1 += 1;
                }
                let acked = c
                    .ack(pb::AckRequest {
                        topic: topic.into(),
                        group: group.into(),
                        receipts,
                    })
                    .await;
                if let Ok(a) = acked {
                    for res in a.into_inner().results {
                        assert!(res.ok || res.reason == "RECEIPT_EXPIRED", "{res:?}");
                    }
                }
            }
        }
        seen
    }

    pub async fn produce(&self, topic: &str, ids: std::ops::Range<u32>) -> Vec<pb::Produced> {
        // As a client does: one batch per partition, each to its leader.
        let ring = dsync_client::routing::PartitionRing::new(3);
        let mut by_partition: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for i in ids {
            by_partition
                .entry(ring.partition(format!("key-{}", i % 17).as_bytes()))
                .or_default()
                .push(i);
        }
        let mut out = Vec::new();
        for chunk in by_partition.values().flat_map(|ids| ids.chunks(10)) {
            let messages: Vec<pb::Message> = chunk
                .iter()
                .map(|i| pb::Message {
                    key: format!("key-{}", i % 17).into_bytes(),
                    payload: payload(*i),
                    message_id: format!("m{i}"),
                    ..Default::default()
                })
                .collect();
            let r = self
                .call(|mut c| {
                    let messages = messages.clone();
                    async move {
                        c.produce(pb::ProduceRequest {
                            topic: topic.into(),
                            messages,
                            partition: None,
                        })
                        .await
                    }
                })
                .await
                .unwrap();
            out.extend(r.results);
        }
        out
    }

    /// A leader-following queue client over every replica.
    pub fn queue_client(&self) -> dsync_client::QueueClient {
        let conn = dsync_client::Conn::new(
            self.addrs.values().cloned(),
            dsync_client::Options::default(),
        )
        .unwrap();
        dsync_client::QueueClient::new(conn)
    }
}

pub fn payload(i: u32) -> Vec<u8> {
    let mut p = format!("payload-{i}-").into_bytes();
    p.resize(100 + (i as usize % 50), (i % 251) as u8);
    p
}

pub async fn wait_partitions_led(c: &Cluster, topic: &str, n: usize) -> pb::TopicInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = c
            .call(|mut cl| async move {
                cl.describe_topic(pb::DescribeTopicRequest {
                    name: topic.into(),
                    include_consumers: false,
                })
                .await
            })
            .await
            .unwrap();
        if info.partitions.len() == n && info.partitions.iter().all(|p| p.leader_id != 0) {
            return info;
        }
        assert!(Instant::now() < deadline, "partitions not led: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
