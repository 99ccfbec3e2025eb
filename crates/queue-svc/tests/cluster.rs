//! A three-replica queue-svc cluster over real gRPC sockets on 127.0.0.1:
//! topics and partitions placed by the metadata group, produce and consume
//! across partition leaders, a partition leader killed and restarted, dedup
//! across the failover, and dead letters.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proto::queue::v1 as pb;

mod common;
use common::{payload, wait_partitions_led, Cluster};

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
                    partitions: 1,
                    replication_factor: 5,
                    ..Default::default()
                }),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "REPLICATION_FACTOR_TOO_HIGH");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = c
        .call(|mut cl| async move {
            cl.create_topic(pb::CreateTopicRequest {
                name: "empty".into(),
                config: Some(pb::TopicConfig::default()),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let info = proto::status::error_info(&e).unwrap();
    assert_eq!(info.metadata["field"], "config.partitions");
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
    // Once it caught up, leadership returns to it: leaders spread again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = wait_partitions_led(&c, "orders", 3).await;
        let leaders: BTreeSet<u64> = info.partitions.iter().map(|p| p.leader_id).collect();
        if leaders.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaders not rebalanced: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
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

    // Back-pressure and limits: a topic of depth 5 refuses a batch that
    // would pass it, whole; an oversized message is refused.
    c.call(|mut cl| async move {
        cl.create_topic(pb::CreateTopicRequest {
            name: "small".into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                max_depth: 5,
                max_message_bytes: 1000,
                dead_letter_disabled: true,
                ..Default::default()
            }),
        })
        .await
    })
    .await
    .unwrap();
    wait_partitions_led(&c, "small", 1).await;
    let msgs = |n: usize, size: usize| -> Vec<pb::Message> {
        (0..n)
            .map(|_| pb::Message {
                payload: vec![1; size],
                ..Default::default()
            })
            .collect()
    };
    let ok = c
        .call(|mut cl| {
            let m = msgs(4, 10);
            async move {
                cl.produce(pb::ProduceRequest {
                    topic: "small".into(),
                    messages: m,
                    partition: None,
                })
                .await
            }
        })
        .await
        .unwrap();
    assert_eq!(ok.results.len(), 4);
    let e = c
        .call(|mut cl| {
            let m = msgs(2, 10);
            async move {
                cl.produce(pb::ProduceRequest {
                    topic: "small".into(),
                    messages: m,
                    partition: None,
                })
                .await
            }
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert_eq!(proto::status::reason(&e), "DEPTH_EXCEEDED");
    let info = proto::status::error_info(&e).unwrap();
    assert_eq!(
        (
            info.metadata["depth"].as_str(),
            info.metadata["limit"].as_str()
        ),
        ("6", "5")
    );
    let e = c
        .call(|mut cl| {
            let m = msgs(1, 1001);
            async move {
                cl.produce(pb::ProduceRequest {
                    topic: "small".into(),
                    messages: m,
                    partition: None,
                })
                .await
            }
        })
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "MESSAGE_TOO_LARGE");
    let e = c
        .call(|mut cl| async move {
            cl.receive(pb::ReceiveRequest {
                topic: "small".into(),
                group: "nobody".into(),
                max_messages: 1,
                ..Default::default()
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), proto::status::reason(&e).as_str()),
        (tonic::Code::NotFound, "GROUP_NOT_FOUND")
    );

    // Unknown topic and bad receipts get precise statuses.
    let e = c
        .call(|mut cl| async move {
            cl.produce(pb::ProduceRequest {
                topic: "nope".into(),
                messages: vec![pb::Message::default()],
                partition: None,
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
    c.call(|mut cl| async move {
        cl.delete_topic(pb::DeleteTopicRequest {
            name: "small".into(),
        })
        .await
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let groups: usize = c.servers.values().map(|s| s.node().groups().len()).sum();
        // Their payload directories go with them.
        let dirs: usize = (1..=3u64)
            .map(|n| {
                std::fs::read_dir(c.dir.path().join(format!("n{n}/partitions")))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum();
        if groups == 3 && dirs == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{groups} groups still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in c.servers.keys().copied().collect::<Vec<_>>() {
        c.kill(id).await;
    }
}

/// With five replicas, a partition lives on its replication factor of
/// them (placed by consistent hashing), and only those run its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_live_on_rf_of_five_replicas() {
    let mut c = Cluster::start_n(5).await;
    let q = c.queue_client();
    q.create_topic(
        "wide",
        pb::TopicConfig {
            partitions: 6,
            replication_factor: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // DescribeTopic on one replica knows the leaders of the partitions it
    // hosts; the client merges every replica's view.
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = q.describe_everywhere("wide").await.unwrap();
        if info.partitions.iter().all(|p| p.leader_id != 0) {
            break info;
        }
        assert!(Instant::now() < deadline, "not led: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut hosted: HashMap<u64, usize> = HashMap::new();
    for p in &info.partitions {
        assert_eq!(p.replica_ids.len(), 3, "{p:?}");
        assert!(p.replica_ids.contains(&p.leader_id), "{p:?}");
        for r in &p.replica_ids {
            *hosted.entry(*r).or_default() += 1;
        }
    }
    assert!(hosted.len() >= 4, "spread over the replicas: {hosted:?}");
    // Each replica runs exactly the groups placed on it: the metadata
    // group, plus its partitions of `wide` and of `wide.dlq` (same
    // placement).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = c
            .servers
            .iter()
            .all(|(id, s)| s.node().groups().len() == 1 + 2 * hosted.get(id).copied().unwrap_or(0));
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "groups not as placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = q
        .produce(
            "wide",
            (0..60u32)
                .map(|i| pb::Message {
                    key: format!("k{i}").into_bytes(),
                    payload: vec![1; 10],
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .unwrap();
    let used: BTreeSet<u32> = res.iter().map(|r| r.partition).collect();
    assert!(used.len() >= 4, "{used:?}");
    for id in c.servers.keys().copied().collect::<Vec<_>>() {
        c.kill(id).await;
    }
}
