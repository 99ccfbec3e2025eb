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

    // 1000 key-less messages without ids in batches of 100: round robin
    // spreads every batch over the partitions.
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

/// Subscribe: the server never sends more messages than the consumer
/// granted credits for; acks on the stream settle them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_respects_credits() {
    let c = Cluster::start().await;
    let q = c.queue_client();
    // ASYNC durability: acknowledged before the fsync; same semantics
    // short of a machine crash.
    q.create_topic(
        "jobs",
        pb::TopicConfig {
            partitions: 1,
            durability: pb::Durability::Async as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    q.create_group("jobs", "w", None, None).await.unwrap();
    let info = wait_partitions_led(&c, "jobs", 1).await;
    let msgs: Vec<pb::Message> = (0..20u32)
        .map(|i| pb::Message {
            payload: format!("job-{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    q.produce("jobs", msgs).await.unwrap();

    let leader = info.partitions[0].leader_addr.clone();
    let mut cl = c.client(&leader).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(8);
    tx.send(pb::SubscribeRequest {
        topic: "jobs".into(),
        group: "w".into(),
        consumer: "push".into(),
        credits: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = cl
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<pb::ReceivedMessage> = Vec::new();
    while got.len() < 5 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("messages within 10 s")
            .unwrap()
            .unwrap();
        got.extend(r.messages);
    }
    assert_eq!(got.len(), 5, "exactly the credit");
    // No credit left: nothing more comes, however long we wait.
    let more = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(more.is_err(), "a message arrived without credit: {more:?}");
    // Acks on the stream settle; they grant nothing.
    tx.send(pb::SubscribeRequest {
        acks: got.iter().map(|m| m.receipt.clone()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.ack_results.len(), 5);
    assert!(r.ack_results.iter().all(|a| a.ok), "{:?}", r.ack_results);
    assert!(r.messages.is_empty());
    // Fifteen more credits bring the other fifteen.
    tx.send(pb::SubscribeRequest {
        credits: 15,
        ..Default::default()
    })
    .await
    .unwrap();
    got.clear();
    while got.len() < 15 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.extend(r.messages);
    }
    assert_eq!(got.len(), 15);
    let mut payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 15);
}

/// A partition leader cut off from the other replicas (Raft traffic) while
/// producers and consumers run: it steps down, the others take over, and
/// after healing every acknowledged message has been delivered; no
/// message id was stored twice. Prints the longest produce and consume
/// pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_loses_nothing() {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let c = Cluster::start().await;
    let q = c.queue_client();
    q.create_topic(
        "pay",
        pb::TopicConfig {
            partitions: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    q.create_group(
        "pay",
        "g",
        Some(pb::GroupConfig {
            visibility_timeout_ms: 3_000,
            ..Default::default()
        }),
        None,
    )
    .await
    .unwrap();
    let info = wait_partitions_led(&c, "pay", 3).await;
    let acked: Arc<parking_lot::Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    type Places = HashMap<String, BTreeSet<(u32, u64)>>;
    let seen: Arc<parking_lot::Mutex<Places>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pauses = Arc::new(parking_lot::Mutex::new((Duration::ZERO, Duration::ZERO)));

    let producer = {
        let (q, acked, pauses) = (c.queue_client(), acked.clone(), pauses.clone());
        tokio::spawn(async move {
            let mut last = Instant::now();
            for b in 0..300u32 {
                let batch: Vec<pb::Message> = (0..10)
                    .map(|k| pb::Message {
                        key: format!("k{}", (b * 10 + k) % 31).into_bytes(),
                        payload: format!("pay-{}", b * 10 + k).into_bytes(),
                        message_id: format!("pay-{}", b * 10 + k),
                        ..Default::default()
                    })
                    .collect();
                // Retried until acknowledged: ids make retries safe.
                loop {
                    if q.produce("pay", batch.clone()).await.is_ok() {
                        break;
                    }
                }
                let mut p = pauses.lock();
                p.0 = p.0.max(last.elapsed());
                last = Instant::now();
                let mut a = acked.lock();
                for m in batch {
                    a.insert(m.message_id, m.payload);
                }
            }
        })
    };
    let consumer = {
        let (q, seen, stop, pauses) =
            (c.queue_client(), seen.clone(), stop.clone(), pauses.clone());
        tokio::spawn(async move {
            let mut last = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let Ok(msgs) = q.receive("pay", "g", "c", 100, 200).await else {
                    continue;
                };
                if msgs.is_empty() {
                    continue;
                }
                {
                    let mut p = pauses.lock();
                    p.1 = p.1.max(last.elapsed());
                    last = Instant::now();
                }
                {
                    let mut s = seen.lock();
                    for m in &msgs {
                        s.entry(m.message_id.clone())
                            .or_default()
                            .insert((m.partition, m.offset));
                    }
                }
                let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
                let _ = q.ack("pay", "g", &receipts).await;
            }
        })
    };
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.lock().len() < n {
                assert!(
                    Instant::now() < deadline,
                    "stalled at {}",
                    acked.lock().len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_acked(500).await;
    let victim = info.partitions[0].leader_id;
    c.faults.isolate(victim, &[1, 2, 3]);
    wait_acked(1500).await;
    c.faults.heal();
    producer.await.unwrap();
    let acknowledged = acked.lock().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let s = seen.lock();
            acknowledged.keys().filter(|k| !s.contains_key(*k)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged messages never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    consumer.await.unwrap();
    let s = seen.lock();
    for (id, places) in s.iter() {
        assert_eq!(places.len(), 1, "{id} stored twice: {places:?}");
    }
    let (p, cns) = *pauses.lock();
    println!(
        "{} acknowledged, all delivered; longest produce pause {p:?}, consume pause {cns:?}",
        acknowledged.len()
    );
}

/// Replay and purge reach every partition on its own leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_replays_and_purge_empties_every_partition() {
    let c = Cluster::start().await;
    let q = c.queue_client();
    q.create_topic(
        "orders",
        pb::TopicConfig {
            partitions: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    q.create_group("orders", "g", None, None).await.unwrap();
    let info = wait_partitions_led(&c, "orders", 3).await;
    let msgs: Vec<pb::Message> = (0..30u32)
        .map(|i| pb::Message {
            key: format!("k{i}").into_bytes(),
            payload: format!("o{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    q.produce("orders", msgs).await.unwrap();
    let drain = |want: usize| {
        let q = q.clone();
        async move {
            let mut got = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while got < want {
                assert!(Instant::now() < deadline, "got {got} of {want}");
                let msgs = q.receive("orders", "g", "c", 100, 200).await.unwrap();
                got += msgs.len();
                let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
                if !receipts.is_empty() {
                    let acks = q.ack("orders", "g", &receipts).await.unwrap();
                    assert!(acks.iter().all(|a| a.ok), "{acks:?}");
                }
            }
            got
        }
    };
    assert_eq!(drain(30).await, 30);
    // Acked messages are gone from storage (the only group acked them), so
    // a replay to the earliest finds nothing; new ones replay.
    let more: Vec<pb::Message> = (30..45u32)
        .map(|i| pb::Message {
            key: format!("k{i}").into_bytes(),
            payload: format!("o{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    q.create_group("orders", "late", None, None).await.unwrap();
    // A group reaches the partitions moments after CreateGroup answers
    // (their leaders' reconcilers); wait for it, so the new messages are
    // owed to it from the start.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = q.describe_everywhere("orders").await.unwrap();
        let late = info.groups.iter().find(|g| g.name == "late");
        if late.is_some_and(|g| g.partitions.len() == 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "group late not on every partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    q.produce("orders", more).await.unwrap();
    assert_eq!(drain(15).await, 15);
    // "late" has not consumed them: the messages stay stored for it; "g"
    // replays them after a reset.
    let positions = q
        .reset_group(
            "orders",
            "g",
            pb::StartPosition {
                kind: pb::PositionKind::Earliest as i32,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(positions.len(), 3, "{positions:?}");
    assert_eq!(drain(15).await, 15, "replayed");
    let (purged, _) = q.purge_topic("orders").await.unwrap();
    assert_eq!(purged, 15, "late's 15 were still stored");
    let after = q.describe_everywhere("orders").await.unwrap();
    assert_eq!(after.depth, 0);
    assert_eq!(info.partitions.len(), after.partitions.len());
}
