//! lock-svc clusters over real gRPC sockets on 127.0.0.1: mutual exclusion
//! and fencing under leader kills and partitions, session expiry of a
//! crashed client, waits that survive leader changes, leader following and
//! bad input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsync_client::{LockClient, LockMode};
use parking_lot::Mutex;
use proto::lock::v1::*;
use tonic::Code;

mod common;
use common::Cluster;

/// An exclusive acquire waiting up to `wait_s` seconds, in the background.
fn spawn_acquire(
    client: LockClient,
    session: u64,
    resource: &'static str,
    wait_s: u64,
) -> tokio::task::JoinHandle<Result<AcquireResponse, tonic::Status>> {
    tokio::spawn(async move {
        client
            .acquire(
                session,
                resource,
                LockMode::Exclusive,
                Some(Duration::from_secs(wait_s)),
            )
            .await
    })
}

/// One exclusive holding as the client saw it.
#[derive(Debug, Clone)]
struct Held {
    #[allow(dead_code)] // shown in assertion messages
    client: usize,
    token: u64,
    from: Instant,
    to: Instant,
}

fn check_history(mut h: Vec<Held>) -> usize {
    h.sort_by_key(|x| x.from);
    for w in h.windows(2) {
        assert!(
            w[0].to <= w[1].from,
            "exclusive holdings overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
        assert!(
            w[1].token > w[0].token,
            "fencing tokens must increase in grant order: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    h.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_and_fencing_survive_leader_kill_and_partition() {
    let mut c = Cluster::start().await;
    c.leader().await;
    let history: Arc<Mutex<Vec<Held>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|i| {
            let client = c.client();
            let (history, stop) = (history.clone(), stop.clone());
            tokio::spawn(async move {
                let session = client
                    .open_session(Duration::from_secs(5), &format!("worker-{i}"))
                    .await
                    .expect("session");
                // Bounded: at most 400 rounds each.
                for _ in 0..400 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let g = match session
                        .acquire("hot", LockMode::Exclusive, Some(Duration::from_secs(3)))
                        .await
                    {
                        Ok(g) => g,
                        Err(_) => continue,
                    };
                    let from = Instant::now();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let to = Instant::now();
                    history.lock().push(Held {
                        client: i,
                        token: g.fencing_token(),
                        from,
                        to,
                    });
                    // If the release is not acknowledged the holding may
                    // extend further; keep going with a fresh acquire,
                    // which the server refuses while we still hold it.
                    let _ = g.release().await;
                }
                let _ = session.close().await;
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    let l = c.leader().await;
    c.kill(l).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.restart(l).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Partition the leader away from the other two replicas.
    let l = c.leader().await;
    c.faults.isolate(l, &[1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The isolated replica refuses writes: it stepped down (check-quorum)
    // and cannot commit; a direct call gets UNAVAILABLE or times out.
    let mut raw = c.raw(l).await;
    let mut req = tonic::Request::new(OpenSessionRequest {
        request_id: 0,
        ttl_ms: 5_000,
        client_name: "probe".into(),
    });
    req.set_timeout(Duration::from_secs(2));
    match raw.open_session(req).await {
        Ok(r) => panic!("isolated replica accepted a write: {r:?}"),
        Err(e) => assert!(
            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{e:?}"
        ),
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.faults.heal();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let n = check_history(history.lock().clone());
    assert!(n > 50, "enough grants to be meaningful: {n}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_clients_lock_is_released_after_its_ttl() {
    let c = Cluster::start().await;
    c.leader().await;
    let client = c.client();
    // The "crashed" client: a session nobody keeps alive.
    let dead = client
        .open_session_unmanaged(Duration::from_millis(1_500), "crashes")
        .await
        .unwrap();
    let r = client
        .acquire(
            dead.session_id,
            "job",
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )
        .await
        .unwrap();
    let live = client
        .open_session(Duration::from_secs(10), "survivor")
        .await
        .unwrap();
    let t0 = Instant::now();
    let g = live
        .acquire("job", LockMode::Exclusive, Some(Duration::from_secs(10)))
        .await
        .expect("granted once the dead session expires");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "not before the TTL"
    );
    assert!(g.fencing_token() > r.fencing_token);
    let e = client
        .acquire(
            dead.session_id,
            "other",
            LockMode::Shared,
            Some(Duration::ZERO),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{e:?}");
    g.release().await.unwrap();
    live.close().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_is_granted_across_leader_changes() {
    let mut c = Cluster::start().await;
    let l = c.leader().await;
    let client = c.client();
    let a = client
        .open_session(Duration::from_secs(10), "a")
        .await
        .unwrap();
    let b = client
        .open_session(Duration::from_secs(10), "b")
        .await
        .unwrap();
    let ga = a.acquire("res", LockMode::Exclusive, None).await.unwrap();

    // 1. Leadership moves while b waits (b's handler is on the old leader).
    let bid = b.id();
    let waiting = spawn_acquire(b.client().clone(), bid, "res", 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to = (1..=3).find(|&n| n != l).unwrap();
    c.servers[&l].locks.group.transfer_leader(to).await.unwrap();
    let ta = ga.fencing_token();
    ga.release().await.unwrap();
    let rb = waiting
        .await
        .unwrap()
        .expect("granted after the leader changed");
    assert!(rb.fencing_token > ta);
    b.client().release(b.id(), rb.lock_id, "").await.unwrap();

    // 2. The leader handling the wait is killed: the client retries with
    //    the same request id on the new leader and re-attaches to its wait.
    let ga = a.acquire("res", LockMode::Exclusive, None).await.unwrap();
    let l = c.leader().await;
    let bc = LockClient::connect([c.addrs[&l].clone()].into_iter().chain(c.endpoints())).unwrap();
    let waiting = spawn_acquire(bc, bid, "res", 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(l).await;
    c.leader().await;
    let ta = ga.fencing_token();
    ga.release().await.unwrap();
    let rb = waiting
        .await
        .unwrap()
        .expect("granted after the leader was killed");
    assert!(rb.fencing_token > ta);
    let st = client.status("res").await.unwrap();
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session_id, bid);
    assert!(
        st.waiters.is_empty(),
        "re-attached, not queued twice: {st:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_redirect_and_bad_input_gets_precise_statuses() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let f = (1..=3).find(|&n| n != l).unwrap();
    let mut raw = c.raw(f).await;
    let e = raw
        .open_session(OpenSessionRequest {
            request_id: 0,
            ttl_ms: 5_000,
            client_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let hint = proto::leader_hint(&e).expect("leader hint");
    assert_eq!(hint.leader_id, l);
    assert_eq!(hint.leader_addr, c.addrs[&l]);
    assert!(hint.term > 0, "the hint names the leader's term: {hint:?}");
    assert!(e.message().contains(&c.addrs[&l]), "{e:?}");
    // The hint is a status detail (next to the ErrorInfo) and, for older
    // clients, the `dsync-leader-bin` trailer; both say the same.
    assert_eq!(proto::status::leader_hint_detail(&e), Some(hint.clone()));
    assert!(e.metadata().get_bin(proto::LEADER_HINT_METADATA).is_some());
    let info = proto::status::error_info(&e).expect("ErrorInfo");
    assert_eq!(info.reason, "NOT_LEADER");
    assert_eq!(info.metadata["leader_addr"], c.addrs[&l]);
    assert_eq!(info.metadata["term"], hint.term.to_string());

    // tonic's codec errors get documented codes and reasons: an oversized
    // request, and one that is not an AcquireRequest at all.
    let mut leader_raw = c.raw(l).await;
    let e = leader_raw
        .acquire(AcquireRequest {
            session_id: 1,
            resource: "r".repeat(70_000),
            mode: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let info = proto::status::error_info(&e).expect("ErrorInfo");
    assert_eq!(info.reason, "REQUEST_TOO_LARGE");
    assert_eq!(info.metadata["limit_bytes"], "65536");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addrs[&l]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 1 as a string where AcquireRequest has a varint.
    let e = grpc
        .unary::<GetStatusRequest, AcquireResponse, _>(
            tonic::Request::new(GetStatusRequest {
                resource: "not an acquire".into(),
            }),
            http::uri::PathAndQuery::from_static("/dsync.lock.v1.LockService/Acquire"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(proto::status::reason(&e), "MALFORMED_REQUEST");

    // The client, given only the follower, follows the hint.
    let client = LockClient::connect([c.addrs[&f].clone()]).unwrap();
    let s = client
        .open_session(Duration::from_secs(5), "x")
        .await
        .unwrap();
    let g = s.acquire("a", LockMode::Shared, None).await.unwrap();

    // Reads are served by a follower (linearizable via read index).
    let st = raw
        .get_status(GetStatusRequest {
            resource: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.holders.len(), 1);

    let sid = s.id();
    let mut leader = c.raw(l).await;
    let cases: Vec<(tonic::Status, Code)> = vec![
        (
            leader
                .acquire(AcquireRequest {
                    session_id: sid,
                    resource: String::new(),
                    mode: 2,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            leader
                .acquire(AcquireRequest {
                    session_id: sid,
                    resource: "r".repeat(600),
                    mode: 2,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            leader
                .acquire(AcquireRequest {
                    session_id: sid,
                    resource: "r".into(),
                    mode: 2,
                    wait_timeout_ms: Some(10_000_000),
                    request_id: 0,
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            leader
                .acquire(AcquireRequest {
                    session_id: 424_242,
                    resource: "r".into(),
                    mode: 2,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            leader
                .release(ReleaseRequest {
                    session_id: sid,
                    lock_id: 999_999,
                    resource: String::new(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            leader
                .open_session(OpenSessionRequest {
                    request_id: 0,
                    ttl_ms: 5,
                    client_name: String::new(),
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            leader
                .list_locks(ListLocksRequest {
                    page_size: 5000,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
    ];
    let reasons = [
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "SESSION_NOT_FOUND",
        "LOCK_NOT_FOUND",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    ];
    for ((st, code), reason) in cases.into_iter().zip(reasons) {
        assert_eq!(st.code(), code, "{st:?}");
        assert!(!st.message().is_empty());
        let info = proto::status::error_info(&st).expect("every error has an ErrorInfo");
        assert_eq!(info.reason, reason, "{st:?}");
        assert_eq!(info.domain, "dsync.io");
    }
    // Release by a non-holder.
    let other = client
        .open_session(Duration::from_secs(5), "y")
        .await
        .unwrap();
    let e = client
        .release(other.id(), g.lock_id(), "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(proto::status::reason(&e), "LOCK_NOT_FOUND");
    // Deadlock over gRPC: ABORTED naming the cycle.
    let ga = s.acquire("d1", LockMode::Exclusive, None).await.unwrap();
    let gb = other
        .acquire("d2", LockMode::Exclusive, None)
        .await
        .unwrap();
    let first = spawn_acquire(s.client().clone(), s.id(), "d2", 10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = other
        .acquire("d1", LockMode::Exclusive, Some(Duration::from_secs(10)))
        .await
        .err()
        .expect("deadlock victim");
    assert_eq!(e.code(), Code::Aborted);
    assert_eq!(proto::status::reason(&e), "DEADLOCK_VICTIM");
    assert!(e.message().contains("deadlock"), "{e:?}");
    gb.release().await.unwrap();
    first
        .await
        .unwrap()
        .expect("the survivor of the cycle is granted");
    drop(ga);
    // Paged listing.
    let page = client.list_locks(1, "", 0).await.unwrap();
    assert_eq!(page.locks.len(), 1);
    assert!(!page.next_page_token.is_empty());
    c.stop().await;
}
