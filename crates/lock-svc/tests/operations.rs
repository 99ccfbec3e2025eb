//! The operable-service chassis on lock-svc, over real sockets: health,
//! reflection, Prometheus metrics, load shedding, and the membership path
//! a StatefulSet scale-up / scale-down takes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consensus::testkit::bind_local;
use dsync_client::{LockClient, LockMode};
use lock_svc::{LockConfig, LockServer};
use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::{RemoveMemberRequest, StatusRequest};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn cluster(
    n: u64,
    tweak: impl Fn(&mut LockConfig),
) -> (tempfile::TempDir, HashMap<u64, String>, Vec<LockServer>) {
    let dir = tempfile::tempdir().unwrap();
    let (listeners, addrs) = bind_local(n as usize).await.unwrap();
    let mut servers = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut cfg = LockConfig::new(id, addrs.clone(), dir.path().join(format!("n{id}")));
        tweak(&mut cfg);
        servers.push(LockServer::start(cfg, l).unwrap());
    }
    (dir, addrs, servers)
}

async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn wait_serving(addr: &str, service: &str) {
    let mut h = HealthClient::new(channel(addr).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoints(addrs: &HashMap<u64, String>) -> Vec<String> {
    let mut v: Vec<(u64, String)> = addrs.iter().map(|(k, v)| (*k, v.clone())).collect();
    v.sort();
    v.into_iter().map(|(_, a)| a).collect()
}

/// GET /metrics over a raw TCP connection.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            return out;
        }
        assert!(Instant::now() < deadline, "metrics listener not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_metrics_and_admin_status() {
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (_dir, addrs, servers) = cluster(3, |cfg| {
        // One recorder per process: only node 1 exports.
        if cfg.replica.node_id == 1 {
            cfg.replica.metrics_listen = Some(metrics_addr);
        }
    })
    .await;
    for a in addrs.values() {
        wait_serving(a, "").await;
        wait_serving(a, "dsync.lock.v1.LockService").await;
    }

    // Reflection lists every service, so grpcurl works without protos.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut refl = ServerReflectionClient::new(channel(&addrs[&1]).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "dsync.lock.v1.LockService",
        "dsync.admin.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // Drive some traffic, then scrape node 1.
    let client = LockClient::connect(endpoints(&addrs)).unwrap();
    let s = client
        .open_session(Duration::from_secs(10), "m")
        .await
        .unwrap();
    let g = s.acquire("m/1", LockMode::Exclusive, None).await.unwrap();
    let _ = client.acquire(s.id(), "", LockMode::Exclusive, None).await;
    let mut admin = AdminClient::new(channel(&addrs[&1]).await);
    let st = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.service, "lock-svc");
    assert!(st.healthy);
    assert_eq!(st.members.iter().filter(|m| m.voter).count(), 3);
    assert_eq!(st.groups.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = scrape(metrics_addr).await;
    for want in [
        "dsync_raft_term",
        "dsync_raft_commit_index",
        "dsync_raft_role",
        "dsync_lock_sessions",
        "dsync_lock_locks_held",
        "dsync_lock_grants_total",
        "dsync_grpc_requests_total",
        "dsync_grpc_request_duration_seconds",
    ] {
        assert!(text.contains(want), "{want} missing from /metrics:\n{text}");
    }
    g.release().await.unwrap();
    for s in servers {
        s.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted() {
    let (_dir, addrs, servers) = cluster(3, |cfg| cfg.replica.max_concurrent_requests = 2).await;
    let leader = loop {
        if let Some(s) = servers.iter().find(|s| s.locks.group.status().is_leader()) {
            break s.addr.to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let client = LockClient::connect([leader.clone()]).unwrap();
    let a = client
        .open_session(Duration::from_secs(10), "a")
        .await
        .unwrap();
    let _held = a.acquire("busy", LockMode::Exclusive, None).await.unwrap();
    // Two waiting acquires take both slots …
    let mut waits = Vec::new();
    for i in 0..2 {
        let c = client.clone();
        let sid = c
            .open_session_unmanaged(Duration::from_secs(10), &format!("w{i}"))
            .await
            .unwrap()
            .session_id;
        waits.push(tokio::spawn(async move {
            c.acquire(
                sid,
                "busy",
                LockMode::Exclusive,
                Some(Duration::from_secs(3)),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // … so the next request is refused at once, not queued.
    let mut raw =
        proto::lock::v1::lock_service_client::LockServiceClient::new(channel(&leader).await);
    let t = Instant::now();
    let e = raw
        .get_status(proto::lock::v1::GetStatusRequest {
            resource: "busy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("concurrent"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused, not queued");
    for w in waits {
        assert_eq!(w.await.unwrap().unwrap_err().code(), Code::DeadlineExceeded);
    }
    let _ = addrs;
    for s in servers {
        s.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_joins_as_learner_then_voter_and_scale_down_removes() {
    let (dir, mut addrs, mut servers) = cluster(3, |_| {}).await;
    let client = LockClient::connect(endpoints(&addrs)).unwrap();
    let s = client
        .open_session(Duration::from_secs(10), "x")
        .await
        .unwrap();
    let mut guards = Vec::new();
    for i in 0..20 {
        guards.push(
            s.acquire(&format!("before/{i}"), LockMode::Shared, None)
                .await
                .unwrap(),
        );
    }
    // A fourth replica, as a StatefulSet scale-up starts it: empty, join.
    let l4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a4 = l4.local_addr().unwrap().to_string();
    let mut peers = addrs.clone();
    peers.insert(4, a4.clone());
    let mut cfg = LockConfig::new(4, peers, dir.path().join("n4"));
    cfg.replica.join = true;
    servers.push(LockServer::start(cfg, l4).unwrap());
    addrs.insert(4, a4.clone());
    wait_serving(&a4, "dsync.lock.v1.LockService").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = servers[3].locks.group.status();
        if st.voters.contains(&4) {
            assert_eq!(st.voters, vec![1, 2, 3, 4]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never became a voter: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It has the whole lock table and serves linearizable reads.
    let via4 = LockClient::connect([a4.clone()]).unwrap();
    let list = via4.list_locks(100, "", 0).await.unwrap();
    assert_eq!(list.locks.len(), 20);

    // Scale down: remove node 4 through any replica (follows the leader).
    let conn = dsync_client::Conn::new(endpoints(&addrs), Default::default()).unwrap();
    let r = conn
        .call(|ch| async move {
            AdminClient::new(ch)
                .remove_member(RemoveMemberRequest { node_id: 4 })
                .await
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<u64> = r.members.iter().map(|m| m.node_id).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    servers.pop().unwrap().kill().await;
    // The three remaining replicas still commit.
    guards.push(s.acquire("after", LockMode::Exclusive, None).await.unwrap());
    // Removing the current leader hands leadership away first.
    let leader = servers
        .iter()
        .find(|s| s.locks.group.status().is_leader())
        .unwrap()
        .node()
        .id();
    let e = AdminClient::new(channel(&addrs[&leader]).await)
        .remove_member(RemoveMemberRequest { node_id: leader })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "redirected to the new leader: {e:?}"
    );
    assert!(proto::leader_hint(&e).is_some_and(|h| h.leader_id != leader));
    for s in servers {
        s.kill().await;
    }
}
