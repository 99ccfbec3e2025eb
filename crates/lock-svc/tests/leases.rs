//! Session leases kept in the leader's memory, over real gRPC sockets:
//! keep-alives cost no Raft entry, sessions expire when their keep-alives
//! stop (and only then), a failover gives every session a fresh TTL, a
//! partitioned former leader renews nothing, followers redirect, and one
//! call renews many sessions.

use std::time::{Duration, Instant};

use dsync_client::LockMode;
use proto::lock::v1::*;
use tonic::Code;

mod common;
use common::{eventually, ok_if, Cluster};

fn keep_alive(id: u64) -> KeepAliveRequest {
    KeepAliveRequest {
        session_id: id,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_write_nothing_and_sessions_expire_only_when_they_stop() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let s = client
        .open_session_unmanaged(Duration::from_millis(1_500), "kept")
        .await
        .unwrap();
    let g = client
        .acquire(
            s.session_id,
            "job",
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )
        .await
        .unwrap();
    let group = &c.servers[&l].locks.group;
    let before = group.status();
    // Kept alive for three TTLs: no entry is written for it (no waits
    // exist, so no Tick either), and it does not expire.
    let t0 = Instant::now();
    let mut renewals = 0;
    while t0.elapsed() < Duration::from_millis(4_500) {
        let r = client.keep_alive(s.session_id).await.unwrap();
        assert_eq!(r.ttl_ms, 1_500);
        renewals += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = group.status();
    assert_eq!(after.term, before.term, "no election meanwhile");
    assert_eq!(
        after.last_index, before.last_index,
        "{renewals} keep-alives appended log entries"
    );
    let st = client.status("job").await.unwrap();
    assert_eq!(st.holders.len(), 1, "still held: {st:?}");
    // The leader knows the lease's end; followers do not keep leases.
    for (id, _) in c.servers.iter() {
        let mut raw = c.raw(*id).await;
        let list = raw
            .list_sessions(ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner();
        let mine = list
            .sessions
            .iter()
            .find(|x| x.session_id == s.session_id)
            .unwrap();
        if *id == l {
            let now = dsync_now_ms();
            assert!(
                mine.expires_at_ms > now && mine.expires_at_ms <= now + 1_600,
                "{mine:?} at {now}"
            );
        } else {
            assert_eq!(mine.expires_at_ms, 0, "{mine:?}");
        }
    }

    // The keep-alives stop: the session expires after its TTL, and its
    // lock is released through the log.
    let stopped = Instant::now();
    let live = client
        .open_session(Duration::from_secs(10), "next")
        .await
        .unwrap();
    let g2 = live
        .acquire("job", LockMode::Exclusive, Some(Duration::from_secs(10)))
        .await
        .expect("granted once the session expires");
    assert!(stopped.elapsed() >= Duration::from_millis(1_000));
    assert!(g2.fencing_token() > g.fencing_token);
    let e = client.keep_alive(s.session_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(proto::status::reason(&e), "SESSION_EXPIRED");
    let e = client.keep_alive(987_654_321).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(proto::status::reason(&e), "SESSION_NOT_FOUND");
    c.stop().await;
}

fn dsync_now_ms() -> u64 {
    lock_svc::service::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_renews_many_sessions_and_answers_each() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            client
                .open_session_unmanaged(Duration::from_millis(1_200), &format!("s{i}"))
                .await
                .unwrap()
                .session_id,
        );
    }
    let closed = client
        .open_session_unmanaged(Duration::from_secs(5), "closed")
        .await
        .unwrap()
        .session_id;
    client.close_session(closed).await.unwrap();
    // Renewed together for two TTLs.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2_500) {
        let r = client.keep_alive_many(&ids).await.unwrap();
        assert_eq!(r.results.len(), ids.len());
        for (res, id) in r.results.iter().zip(&ids) {
            assert_eq!(
                (res.session_id, res.ttl_ms, res.reason.as_str()),
                (*id, 1_200, "")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut asked = ids.clone();
    asked.push(closed);
    asked.push(424_242);
    let r = client.keep_alive_many(&asked).await.unwrap();
    assert_eq!(r.ttl_ms, 0);
    let reasons: Vec<&str> = r.results.iter().map(|x| x.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["", "", "", "", "", "SESSION_NOT_FOUND", "SESSION_NOT_FOUND"]
    );
    // Bad input.
    let mut raw = c.raw(l).await;
    let e = raw.keep_alive(keep_alive(0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .keep_alive(KeepAliveRequest {
            session_id: 0,
            session_ids: vec![1; 10_001],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("10000"), "{e:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_gives_sessions_a_fresh_ttl_and_followers_redirect() {
    let mut c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let s = client
        .open_session_unmanaged(Duration::from_millis(2_000), "survives")
        .await
        .unwrap();
    client
        .acquire(
            s.session_id,
            "kept",
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )
        .await
        .unwrap();
    // Followers do not renew: they name the leader.
    let f = (1..=3).find(|&n| n != l).unwrap();
    let e = c
        .raw(f)
        .await
        .keep_alive(keep_alive(s.session_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(proto::status::reason(&e), "NOT_LEADER");
    assert_eq!(proto::leader_hint(&e).unwrap().leader_addr, c.addrs[&l]);

    // A last keep-alive, then the leader dies. The new leader never heard
    // of that keep-alive; it gives the session a whole TTL from when it
    // took over, so 1.9 s of the 2 s TTL later the session is still alive.
    client.keep_alive(s.session_id).await.unwrap();
    let renewed = Instant::now();
    c.kill(l).await;
    let l2 = c.leader().await;
    tokio::time::sleep(Duration::from_millis(1_900).saturating_sub(renewed.elapsed())).await;
    let r = client.keep_alive(s.session_id).await.unwrap();
    assert_eq!(r.ttl_ms, 2_000);
    let st = client.status("kept").await.unwrap();
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].session_id, s.session_id);
    assert!(c.servers[&l2].locks.group.status().is_leader());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_former_leader_renews_nothing() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let s = client
        .open_session_unmanaged(Duration::from_millis(1_500), "cut off")
        .await
        .unwrap();
    let mut raw = c.raw(l).await;
    raw.keep_alive(keep_alive(s.session_id)).await.unwrap();
    c.faults.isolate(l, &[1, 2, 3]);
    // Until it notices (check-quorum), the old leader still believes it
    // leads; it must not answer a keep-alive it cannot confirm. The
    // majority side meanwhile expires the session.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2_500) {
        let mut req = tonic::Request::new(keep_alive(s.session_id));
        req.set_timeout(Duration::from_millis(700));
        match raw.keep_alive(req).await {
            Ok(r) => panic!("a partitioned replica renewed a session: {r:?}"),
            Err(e) => assert!(
                matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                "{e:?}"
            ),
        }
    }
    let others: Vec<u64> = (1..=3).filter(|&n| n != l).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let l2 = loop {
        if let Some(n) = others
            .iter()
            .find(|n| c.servers[n].locks.group.status().is_leader())
        {
            break *n;
        }
        assert!(Instant::now() < deadline, "no leader on the majority side");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut majority = c.raw(l2).await;
    eventually(Duration::from_secs(10), Duration::from_millis(200), || {
        let mut majority = majority.clone();
        async move {
            let list = majority.list_sessions(ListSessionsRequest {}).await;
            let gone = list.is_ok_and(|l| {
                l.get_ref()
                    .sessions
                    .iter()
                    .all(|x| x.session_id != s.session_id)
            });
            ok_if(gone, "the session never expired")
        }
    })
    .await;
    let e = majority
        .keep_alive(keep_alive(s.session_id))
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "SESSION_EXPIRED", "{e:?}");
    c.faults.heal();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_stay_off_until_every_member_runs_a_build_with_them() {
    // A rolling upgrade: replica 3 still runs a build without leases.
    let (listeners, addrs) = consensus::testkit::bind_local(3).await.unwrap();
    let mut c = Cluster {
        dir: tempfile::tempdir().unwrap(),
        addrs,
        servers: Default::default(),
        faults: consensus::testkit::Faults::new(),
        without_leases: [3].into(),
    };
    for (i, l) in listeners.into_iter().enumerate() {
        c.start_on(i as u64 + 1, l);
    }
    let l = c.leader().await;
    let client = c.client();
    let s = client
        .open_session_unmanaged(Duration::from_millis(1_500), "upgrading")
        .await
        .unwrap();
    // Keep-alives go through the log, as the old build expects, and the
    // session lives on through them.
    let before = c.servers[&l].locks.group.status().last_index;
    for _ in 0..8 {
        client.keep_alive(s.session_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let l = c.leader().await;
    assert!(c.servers[&l].locks.group.status().last_index > before + 8);
    assert!(c
        .servers
        .values()
        .all(|x| !x.locks.state.read().leases_in_memory));
    let r = client.keep_alive_many(&[s.session_id, 5]).await.unwrap();
    let reasons: Vec<&str> = r.results.iter().map(|x| x.reason.as_str()).collect();
    assert_eq!(reasons, ["", "SESSION_NOT_FOUND"]);
    // Led by the replica on the old build (which has no gate), the cluster
    // still keeps leases off.
    if l != 3 {
        c.servers[&l].locks.group.transfer_leader(3).await.unwrap();
    }
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { ok_if(c.leader().await == 3, "no transfer to 3") },
    )
    .await;
    for _ in 0..8 {
        client.keep_alive(s.session_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(c
        .servers
        .values()
        .all(|x| !x.locks.state.read().leases_in_memory));
    // Replica 3 is upgraded: leases go on, the session survives the switch.
    c.kill(3).await;
    c.without_leases.clear();
    c.restart(3).await;
    eventually(
        Duration::from_secs(15),
        Duration::from_millis(300),
        || async {
            let on = c
                .servers
                .values()
                .all(|x| x.locks.state.read().leases_in_memory);
            if !on {
                client.keep_alive(s.session_id).await.unwrap();
            }
            ok_if(on, "leases never enabled")
        },
    )
    .await;
    let l = c.leader().await;
    let before = c.servers[&l].locks.group.status().last_index;
    for _ in 0..8 {
        client.keep_alive(s.session_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = c.servers[&l].locks.group.status();
    assert!(after.is_leader());
    assert_eq!(after.last_index, before, "keep-alives left the log");
    c.stop().await;
}
