//! The Rust `QueueClient` against three replicas: batches split by
//! partition and sent to each partition's leader, receives from every
//! leader at once, and an ordered group that keeps partition order while
//! a partition leader is killed mid-stream.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::queue::v1 as pb;

mod common;
use common::{wait_partitions_led, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_routes_partitions_and_ordered_groups_keep_order_across_failover() {
    let mut c = Cluster::start().await;
    let q = c.queue_client();
    q.create_topic(
        "events",
        pb::TopicConfig {
            partitions: 4,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    q.create_group(
        "events",
        "audit",
        Some(pb::GroupConfig {
            mode: pb::GroupMode::Ordered as i32,
            visibility_timeout_ms: 2_000,
            ..Default::default()
        }),
        None,
    )
    .await
    .unwrap();
    wait_partitions_led(&c, "events", 4).await;

    // 1000 key-less messages in batches of 100: the client gives each an
    // id, so every batch spreads over the partitions and retries are safe.
    let mut sent: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
    for b in 0..10u32 {
        let msgs: Vec<pb::Message> = (0..100u32)
            .map(|i| pb::Message {
                payload: format!("event-{}", b * 100 + i).into_bytes(),
                ..Default::default()
            })
            .collect();
        let res = q.produce("events", msgs.clone()).await.unwrap();
        assert_eq!(res.len(), 100);
        for (r, m) in res.iter().zip(&msgs) {
            assert!(!r.duplicate);
            assert!(sent
                .insert((r.partition, r.offset), m.payload.clone())
                .is_none());
        }
    }
    let used: std::collections::BTreeSet<u32> = sent.keys().map(|(p, _)| *p).collect();
    assert_eq!(
        used.len(),
        4,
        "key-less messages spread over every partition"
    );
    let info = q.describe_everywhere("events").await.unwrap();
    assert_eq!(info.depth, 1000);

    // Consume in order; kill a partition leader once a third is through.
    let victim = info.partitions[1].leader_id;
    let mut killed = false;
    let mut acked: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut delivered = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.values().map(Vec::len).sum::<usize>() < 1000 {
        assert!(Instant::now() < deadline, "stuck at {acked:?}");
        if !killed && delivered > 330 {
            c.kill(victim).await;
            killed = true;
        }
        let Ok(msgs) = q.receive("events", "audit", "auditor", 100, 200).await else {
            continue;
        };
        delivered += msgs.len();
        // An ordered group has at most one message per partition in flight.
        let mut per: BTreeMap<u32, usize> = BTreeMap::new();
        for m in &msgs {
            *per.entry(m.partition).or_default() += 1;
            assert_eq!(sent[&(m.partition, m.offset)], m.payload, "payload intact");
        }
        assert!(
            per.values().all(|&n| n == 1),
            "one in flight per partition: {per:?}"
        );
        let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
        if receipts.is_empty() {
            continue;
        }
        let Ok(results) = q.ack("events", "audit", &receipts).await else {
            continue; // redelivered later, in order
        };
        for (m, r) in msgs.iter().zip(results) {
            if r.ok {
                let seq = acked.entry(m.partition).or_default();
                if seq.last() != Some(&m.offset) {
                    seq.push(m.offset);
                }
            }
        }
    }
    assert!(killed);
    for (p, seq) in &acked {
        let expected: Vec<u64> = sent
            .keys()
            .filter(|(q, _)| q == p)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            seq, &expected,
            "partition {p}: acked in partition order, each once"
        );
    }
    for id in c.servers.keys().copied().collect::<Vec<_>>() {
        c.kill(id).await;
    }
}
