//! A three-replica queue-svc cluster over real gRPC sockets on 127.0.0.1:
//! topics and partitions placed by the metadata group, produce and consume
//! across partition leaders, a partition leader killed and restarted, dedup
//! across the failover, and dead letters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use consensus::testkit::bind_local;
use proto::queue::v1 as pb;
use proto::queue::v1::queue_service_client::QueueServiceClient;
use queue_svc::server::{QueueConfig, QueueServer};
use tonic::transport::Channel;

struct Cluster {
    dir: tempfile::TempDir,
    addrs: HashMap<u64, String>,
    servers: HashMap<u64, QueueServer>,
}

impl Cluster {
    async fn start() -> Self {
        let (listeners, addrs) = bind_local(3).await.unwrap();
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            addrs,
            servers: HashMap::new(),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.start_on(i as u64 + 1, l);
        }
        c
    }

    fn start_on(&mut self, id: u64, l: tokio::net::TcpListener) {
        let cfg = QueueConfig::new(
            id,
            self.addrs.clone(),
            self.dir.path().join(format!("n{id}")),
        );
        self.servers.insert(id, QueueServer::start(cfg, l).unwrap());
    }

    async fn restart(&mut self, id: u64) {
        let l = tokio::net::TcpListener::bind(&self.addrs[&id])
            .await
            .unwrap();
        self.start_on(id, l);
    }

    async fn kill(&mut self, id: u64) {
        if let Some(s) = self.servers.remove(&id) {
            s.kill().await;
        }
    }

    async fn client(&self, addr: &str) -> QueueServiceClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        QueueServiceClient::new(ch)
    }

    /// Calls `f` on some replica, following leader hints and waiting out
    /// elections, within 20 s.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, tonic::Status>
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
    async fn drain(
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

    async fn produce(&self, topic: &str, ids: std::ops::Range<u32>) -> Vec<pb::Produced> {
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
}

fn payload(i: u32) -> Vec<u8> {
    let mut p = format!("payload-{i}-").into_bytes();
    p.resize(100 + (i as usize % 50), (i % 251) as u8);
    p
}

async fn wait_partitions_led(c: &Cluster, topic: &str, n: usize) -> pb::TopicInfo {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_failover_dedup_and_dead_letters() {
    let mut c = Cluster::start().await;
    let created = c
        .call(|mut cl| async move {
            cl.create_topic(pb::CreateTopicRequest {
                name: "orders".into(),
                config: Some(pb::TopicConfig {
                    partitions: 3,
                    max_delivery_attempts: 2,
                    ..Default::default()
                }),
            })
            .await
        })
        .await
        .unwrap();
    assert_eq!(created.partitions.len(), 3);
    // Bad configs are refused precisely.
    let e = c
        .call(|mut cl| async move {
            cl.create_topic(pb::CreateTopicRequest {
                name: "big".into(),
                config: Some(pb::TopicConfig {
                    replication_factor: 5,
                    ..Default::default()
                }),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "REPLICATION_FACTOR_TOO_HIGH");
    c.call(|mut cl| async move {
        cl.create_group(pb::CreateGroupRequest {
            topic: "orders".into(),
            group: "g".into(),
            config: Some(pb::GroupConfig {
                visibility_timeout_ms: 2_000,
                backoff_base_ms: Some(10),
                backoff_cap_ms: 50,
                ..Default::default()
            }),
            start: None,
        })
        .await
    })
    .await
    .unwrap();
    let info = wait_partitions_led(&c, "orders", 3).await;
    // Leaders spread over the replicas (preferred leaders, after transfer).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = wait_partitions_led(&c, "orders", 3).await;
        let leaders: BTreeSet<u64> = info.partitions.iter().map(|p| p.leader_id).collect();
        if leaders.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "leaders not spread: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let produced = c.produce("orders", 0..300).await;
    assert!(produced.iter().all(|p| !p.duplicate));
    let parts: BTreeSet<u32> = produced.iter().map(|p| p.partition).collect();
    assert_eq!(parts.len(), 3, "keys spread over the partitions");
    let seen = c.drain("orders", "g", 300).await;
    assert_eq!(seen.len(), 300);
    for i in 0..300u32 {
        assert_eq!(seen[&format!("m{i}")].0, payload(i));
    }

    // Kill the leader of partition 0; the rest goes on.
    let victim = info.partitions[0].leader_id;
    c.kill(victim).await;
    let more = c.produce("orders", 300..400).await;
    // Retrying already-acknowledged ids after the failover stores nothing.
    let again = c.produce("orders", 300..340).await;
    assert!(again.iter().all(|p| p.duplicate), "{again:?}");
    let first: HashMap<&str, (u32, u64)> = more
        .iter()
        .map(|p| (p.message_id.as_str(), (p.partition, p.offset)))
        .collect();
    for b in &again {
        assert_eq!(
            first[b.message_id.as_str()],
            (b.partition, b.offset),
            "the original offset"
        );
    }
    let seen = c.drain("orders", "g", 100).await;
    assert_eq!(seen.len(), 100, "every acknowledged message delivered");
    let dups: u32 = seen.values().map(|(_, n)| n - 1).sum();
    assert_eq!(dups, 0, "no duplicates where message ids were used");

    // The killed replica restarts from disk and catches up.
    c.restart(victim).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st: Vec<_> = c.servers[&victim].node().status();
        if st.len() >= 7 && st.iter().all(|s| s.leader.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted replica idle: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A poison message: nacked until its attempts run out, it moves to
    // orders.dlq with its history in headers.
    c.produce("orders", 1000..1001).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut nacks = 0;
    while nacks < 2 {
        assert!(Instant::now() < deadline, "poison message not redelivered");
        for id in c.servers.keys() {
            let mut cl = c.client(&c.addrs[id]).await;
            let Ok(r) = cl
                .receive(pb::ReceiveRequest {
                    topic: "orders".into(),
                    group: "g".into(),
                    consumer: "poison".into(),
                    max_messages: 10,
                    wait_ms: 100,
                    ..Default::default()
                })
                .await
            else {
                continue;
            };
            for m in r.into_inner().messages {
                assert_eq!(m.message_id, "m1000");
                cl.nack(pb::NackRequest {
                    topic: "orders".into(),
                    group: "g".into(),
                    receipts: vec![m.receipt],
                    delay_ms: None,
                    error: "cannot parse".into(),
                })
                .await
                .unwrap();
                nacks += 1;
            }
        }
    }
    c.call(|mut cl| async move {
        cl.create_group(pb::CreateGroupRequest {
            topic: "orders.dlq".into(),
            group: "dead".into(),
            config: None,
            start: None,
        })
        .await
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let mut got = Vec::new();
        for id in c.servers.keys() {
            let mut cl = c.client(&c.addrs[id]).await;
            if let Ok(r) = cl
                .receive(pb::ReceiveRequest {
                    topic: "orders.dlq".into(),
                    group: "dead".into(),
                    consumer: "ops".into(),
                    max_messages: 10,
                    wait_ms: 100,
                    ..Default::default()
                })
                .await
            {
                got.extend(r.into_inner().messages);
            }
        }
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "dead letter never arrived");
    };
    assert_eq!(dead.len(), 1);
    let h = &dead[0].headers;
    assert_eq!(h["dsync-dlq-origin-topic"], "orders");
    assert_eq!(h["dsync-dlq-attempts"], "2");
    assert_eq!(h["dsync-dlq-last-error"], "cannot parse");
    assert_eq!(h["dsync-dlq-origin-message-id"], "m1000");
    assert_eq!(dead[0].payload, payload(1000));

    // Unknown topic and bad receipts get precise statuses.
    let e = c
        .call(|mut cl| async move {
            cl.produce(pb::ProduceRequest {
                topic: "nope".into(),
                messages: vec![pb::Message::default()],
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "TOPIC_NOT_FOUND");
    let e = c
        .call(|mut cl| async move {
            cl.ack(pb::AckRequest {
                topic: "orders".into(),
                group: "g".into(),
                receipts: vec!["garbage".into()],
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "INVALID_ARGUMENT");

    // Deleting the topics stops their groups on every replica.
    for name in ["orders", "orders.dlq"] {
        c.call(|mut cl| async move {
            cl.delete_topic(pb::DeleteTopicRequest { name: name.into() })
                .await
        })
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let groups: usize = c.servers.values().map(|s| s.node().groups().len()).sum();
        if groups == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{groups} groups still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in c.servers.keys().copied().collect::<Vec<_>>() {
        c.kill(id).await;
    }
}
