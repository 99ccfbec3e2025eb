//! A three-node cluster over real gRPC sockets on 127.0.0.1: replication,
//! leader failover, and a killed node restarting from disk and catching up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consensus::testkit::{bind_local, GrpcNode, Recorders};
use consensus::{Config, Error};

const G: u64 = 1;

async fn leader_of(nodes: &HashMap<u64, GrpcNode>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaders: Vec<u64> = nodes
            .values()
            .map(|n| n.node.group(G).unwrap().status())
            .filter(|s| s.is_leader())
            .map(|s| s.node)
            .collect();
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_loopback_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorders::default();
    let factory = rec.factory();
    let (listeners, peers) = bind_local(3).await.unwrap();
    let mut nodes = HashMap::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let cfg = Config::new(id, dir.path().join(format!("n{id}")));
        let n = GrpcNode::start(cfg, l, peers.clone(), &[G], &[1, 2, 3], &factory).unwrap();
        nodes.insert(id, n);
    }
    let leader = leader_of(&nodes).await;
    let h = nodes[&leader].node.group(G).unwrap();
    for i in 0..100u32 {
        h.propose(i.to_be_bytes().to_vec()).await.unwrap();
    }
    // The follower's hint names the leader's real address.
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    match nodes[&follower]
        .node
        .group(G)
        .unwrap()
        .propose(vec![1])
        .await
    {
        Err(Error::NotLeader {
            leader: Some(l),
            leader_addr: Some(a),
            ..
        }) => {
            assert_eq!(l, leader);
            assert_eq!(a, peers[&leader]);
        }
        other => panic!("expected a leader hint, got {other:?}"),
    }

    // Kill the leader; the others elect a new one and commit.
    nodes.remove(&leader).unwrap().kill().await;
    let new = leader_of(&nodes).await;
    assert_ne!(new, leader);
    let h = nodes[&new].node.group(G).unwrap();
    for i in 100..150u32 {
        h.propose(i.to_be_bytes().to_vec()).await.unwrap();
    }

    // The killed node restarts on the same port from its directory.
    let l = tokio::net::TcpListener::bind(&peers[&leader])
        .await
        .unwrap();
    let cfg = Config::new(leader, dir.path().join(format!("n{leader}")));
    let n = GrpcNode::start(cfg, l, peers.clone(), &[G], &[], &factory).unwrap();
    nodes.insert(leader, n);
    let commit = h.status().commit;
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[&leader].node.group(G).unwrap().status().applied < commit {
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected: Vec<Vec<u8>> = (0..150u32).map(|i| i.to_be_bytes().to_vec()).collect();
    for id in 1..=3 {
        assert_eq!(rec.get(id, G).commands(), expected, "node {id}");
    }
    for (_, n) in nodes {
        n.kill().await;
    }
}

/// A snapshot of several megabytes reaches a node that fell behind the
/// compacted log: streamed in chunks on its own call, written to the
/// receiver's snapshot directory, installed, and the node agrees after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_is_streamed_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorders::default();
    let factory = rec.factory();
    let (listeners, peers) = bind_local(3).await.unwrap();
    let config = |id: u64| {
        let mut cfg = Config::new(id, dir.path().join(format!("n{id}")));
        cfg.snapshot_entries = 50;
        cfg.compact_lag = 0;
        cfg
    };
    let mut nodes = HashMap::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let n = GrpcNode::start(config(id), l, peers.clone(), &[G], &[1, 2, 3], &factory).unwrap();
        nodes.insert(id, n);
    }
    let leader = leader_of(&nodes).await;
    let behind = (1..=3).find(|&n| n != leader).unwrap();
    nodes.remove(&behind).unwrap().kill().await;
    let h = nodes[&leader].node.group(G).unwrap();
    // 400 commands of 16 KiB: a snapshot of about 6.4 MiB, 7 chunks.
    let command = |i: u32| {
        let mut c = vec![(i % 251) as u8; 16 << 10];
        c[..4].copy_from_slice(&i.to_be_bytes());
        c
    };
    for i in 0..400u32 {
        h.propose(command(i)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.status().snapshot_index < 350 {
        assert!(Instant::now() < deadline, "no snapshot: {:?}", h.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let l = tokio::net::TcpListener::bind(&peers[&behind])
        .await
        .unwrap();
    let n = GrpcNode::start(config(behind), l, peers.clone(), &[G], &[], &factory).unwrap();
    nodes.insert(behind, n);
    let commit = h.status().commit;
    let g = nodes[&behind].node.group(G).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.status().applied < commit {
        assert!(Instant::now() < deadline, "not caught up: {:?}", g.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(g.status().snapshots_installed >= 1, "{:?}", g.status());
    let expected: Vec<Vec<u8>> = (0..400u32).map(command).collect();
    assert_eq!(rec.get(behind, G).commands(), expected);
    // The received file sits in the node's own snapshot directory.
    let received = std::fs::read_dir(dir.path().join(format!("n{behind}/snapshots")))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("-r"))
        .count();
    assert!(received >= 1, "no received snapshot file");
    for (_, n) in nodes {
        n.kill().await;
    }
}
