//! Session streams over real gRPC sockets: acquires and releases as
//! messages on one stream, grants pushed when decided, per-operation
//! errors that leave the stream open, the stream keeping its session
//! alive, and waits withdrawn when the stream goes.

use std::time::Duration;

use dsync_client::LockMode;
use tonic::Code;

mod common;
use common::{eventually, ok_if, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_a_sessions_locks_and_keeps_it_alive() {
    let c = Cluster::start().await;
    c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let me = client
        .open_session_unmanaged(Duration::from_millis(1_500), "streamer")
        .await
        .unwrap()
        .session_id;
    let other = client
        .open_session(Duration::from_secs(10), "other")
        .await
        .unwrap();
    let s = client.stream(me).await.unwrap();
    let a = s
        .acquire("a", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    assert!(a.fencing_token > 0);
    // A wait on the stream does not hold up the stream's other operations.
    let held = other
        .acquire("b", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    let (waiting, quick) = tokio::join!(
        async {
            s.acquire("b", LockMode::Exclusive, Some(Duration::from_secs(10)))
                .await
        },
        async {
            let r = s
                .acquire("c", LockMode::Shared, Some(Duration::ZERO))
                .await
                .unwrap();
            let t = held.fencing_token();
            held.release().await.unwrap();
            (r, t)
        }
    );
    let (c_lock, b_first_token) = quick;
    let b = waiting.expect("granted once the other session released");
    assert!(b.fencing_token > b_first_token);
    s.release(c_lock.lock_id, "").await.unwrap();
    // Errors answer the operation; the stream goes on.
    let e = s.acquire("", LockMode::Exclusive, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(proto::status::reason(&e), "INVALID_ARGUMENT");
    let e = s
        .acquire("a", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "ALREADY_HELD");
    let e = s.release(987_654, "").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // No keep-alive for three TTLs: the open stream keeps the session.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let st = client.status("a").await.unwrap();
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].session_id, me);
    s.release(a.lock_id, "").await.unwrap();
    s.release(b.lock_id, "").await.unwrap();
    // Once the stream is gone, nothing renews the session: it expires.
    drop(s);
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let sessions = client.list_sessions().await.unwrap().sessions;
            ok_if(sessions.iter().all(|x| x.session_id != me), "never expired")
        },
    )
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stream_withdraws_its_waits() {
    let c = Cluster::start().await;
    c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let (_holder, g, me) = contended(&client, "busy", "waiter").await;
    let (s, waiting) = waiting_on_stream(&client, me.id(), "busy").await;
    // The client goes away mid-wait: the stream ends, the wait goes.
    waiting.abort();
    drop(s);
    eventually(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let st = client.status("busy").await.unwrap();
            ok_if(st.waiters.is_empty(), format!("wait not withdrawn: {st:?}"))
        },
    )
    .await;
    g.release().await.unwrap();
    let st = client.status("busy").await.unwrap();
    assert!(st.holders.is_empty(), "{st:?}");
    c.stop().await;
}

/// Another session holding `resource` exclusively (with its guard), and
/// a session `name` for the test to contend with it.
async fn contended(
    client: &dsync_client::LockClient,
    resource: &str,
    name: &str,
) -> (
    dsync_client::Session,
    dsync_client::LockGuard,
    dsync_client::Session,
) {
    let holder = client
        .open_session(Duration::from_secs(10), "holder")
        .await
        .unwrap();
    let g = holder
        .acquire(resource, LockMode::Exclusive, None)
        .await
        .unwrap();
    let me = client
        .open_session(Duration::from_secs(10), name)
        .await
        .unwrap();
    (holder, g, me)
}

/// A stream for session `me`, with an exclusive acquire of `resource`
/// (waiting up to 30 s) running on it, queued behind its holder.
async fn waiting_on_stream(
    client: &dsync_client::LockClient,
    me: u64,
    resource: &'static str,
) -> (
    std::sync::Arc<dsync_client::SessionStream>,
    tokio::task::JoinHandle<Result<proto::lock::v1::AcquireResponse, tonic::Status>>,
) {
    let s = std::sync::Arc::new(client.stream(me).await.unwrap());
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move {
            s.acquire(resource, LockMode::Exclusive, Some(Duration::from_secs(30)))
                .await
        })
    };
    queued(client, resource).await;
    (s, waiting)
}

/// Until `resource` has a waiter (within 5 s).
async fn queued(client: &dsync_client::LockClient, resource: &str) {
    eventually(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let st = client.status(resource).await.unwrap();
            ok_if(!st.waiters.is_empty(), "never queued")
        },
    )
    .await;
}

/// A raw stream to replica `leader`, attached for `session`; the sender
/// is handed back so the caller decides what to send and when to
/// half-close.
async fn raw_stream(
    c: &Cluster,
    leader: u64,
    session: u64,
) -> (
    tokio::sync::mpsc::Sender<proto::lock::v1::SessionRequest>,
    tonic::Streaming<proto::lock::v1::SessionResponse>,
) {
    use proto::lock::v1::*;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SessionRequest {
        seq: 1,
        op: Some(session_request::Op::Attach(AttachSession {
            session_id: session,
        })),
    })
    .await
    .unwrap();
    let mut inbound = c
        .raw(leader)
        .await
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let attached = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        attached.result,
        Some(session_response::Result::AttachedTtlMs(_))
    ));
    (tx, inbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_does_not_keep_its_session_and_a_half_close_drains() {
    use proto::lock::v1::*;
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    // Open but silent (no ping, no operation): the client may be gone
    // without the connection noticing; the session expires after its TTL.
    let quiet = client
        .open_session_unmanaged(Duration::from_millis(1_200), "quiet")
        .await
        .unwrap()
        .session_id;
    let (_tx, _inbound) = raw_stream(&c, l, quiet).await;
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let sessions = client.list_sessions().await.unwrap().sessions;
            ok_if(
                sessions.iter().all(|x| x.session_id != quiet),
                "kept alive by silence",
            )
        },
    )
    .await;
    // A half-close after an acquire still gets its answer.
    let me = client
        .open_session_unmanaged(Duration::from_secs(10), "closer")
        .await
        .unwrap()
        .session_id;
    let (tx, mut inbound) = raw_stream(&c, l, me).await;
    tx.send(SessionRequest {
        seq: 7,
        op: Some(session_request::Op::Acquire(AcquireRequest {
            resource: "drained".into(),
            mode: LockMode::Exclusive as i32,
            wait_timeout_ms: Some(0),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let answer = inbound.message().await.unwrap().expect("answered");
    assert_eq!(answer.seq, 7);
    assert!(
        matches!(answer.result, Some(session_response::Result::Acquired(_))),
        "{answer:?}"
    );
    assert!(
        inbound.message().await.unwrap().is_none(),
        "then the stream ends"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_nobody_waits_for_any_more_is_released() {
    let c = Cluster::start().await;
    c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let (_holder, g, me) = contended(&client, "x", "impatient").await;
    let s = client.stream(me.id()).await.unwrap();
    // The caller gives up on the acquire; its wait stays queued …
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        s.acquire("x", LockMode::Exclusive, Some(Duration::from_secs(30))),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(client.status("x").await.unwrap().waiters.len(), 1);
    // … and when it is granted, the stream releases the grant.
    g.release().await.unwrap();
    eventually(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let st = client.status("x").await.unwrap();
            let gone = st.holders.is_empty() && st.waiters.is_empty();
            ok_if(gone, format!("orphaned grant kept: {st:?}"))
        },
    )
    .await;
    drop(s);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_stream_keeps_its_waits_until_it_stops_reading() {
    use proto::lock::v1::*;
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let (_holder, g, me) = contended(&client, "busy", "half-closer").await;
    let (tx, inbound) = raw_stream(&c, l, me.id()).await;
    tx.send(SessionRequest {
        seq: 2,
        op: Some(session_request::Op::Acquire(AcquireRequest {
            resource: "busy".into(),
            mode: LockMode::Exclusive as i32,
            wait_timeout_ms: Some(30_000),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    drop(tx);
    // Half-closed but still read: the wait stays.
    queued(&client, "busy").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.status("busy").await.unwrap().waiters.len(), 1);
    // The client stops reading (cancels the call): the wait goes.
    drop(inbound);
    eventually(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let st = client.status("busy").await.unwrap();
            ok_if(st.waiters.is_empty(), "wait not withdrawn")
        },
    )
    .await;
    g.release().await.unwrap();
    c.stop().await;
}

/// Until `resource`'s holder is `session` (within 10 s).
async fn held_by(client: &dsync_client::LockClient, resource: &str, session: u64) {
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let st = client.status(resource).await.unwrap();
            ok_if(
                st.holders.iter().any(|h| h.session_id == session),
                format!("not held by {session}: {st:?}"),
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moves_to_a_new_leader_with_its_wait_when_the_leader_dies() {
    let mut c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let (_holder, g, me) = contended(&client, "busy", "waiter").await;
    let (s, waiting) = waiting_on_stream(&client, me.id(), "busy").await;
    let mine = s
        .acquire("mine", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    c.kill(l).await;
    // The holder lets go on the new leader: the wait, sent again on the
    // stream the client re-attached there, is the one granted.
    let token = g.fencing_token();
    g.release().await.unwrap();
    let busy = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the wait was never answered")
        .unwrap()
        .expect("granted on the new leader");
    assert!(busy.fencing_token > token);
    held_by(&client, "busy", me.id()).await;
    // The lock taken before the failover is still the session's, and the
    // stream goes on serving it.
    held_by(&client, "mine", me.id()).await;
    s.release(mine.lock_id, "").await.unwrap();
    s.release(busy.lock_id, "").await.unwrap();
    let again = s
        .acquire("mine", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    assert!(again.fencing_token > mine.fencing_token);
    s.release(again.lock_id, "").await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_former_leader_re_attaches_on_its_next_operation() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let me = client
        .open_session(Duration::from_secs(10), "streamer")
        .await
        .unwrap();
    let s = client.stream(me.id()).await.unwrap();
    let a = s
        .acquire("a", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    let f = (1..=3).find(|&n| n != l).unwrap();
    c.servers[&l].locks.group.transfer_leader(f).await.unwrap();
    assert_eq!(c.leader().await, f);
    // The former leader refuses the next operation as NOT_LEADER and ends
    // the stream; the client attaches on the new leader and sends it
    // again: the caller sees neither.
    let b = s
        .acquire("b", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    s.release(a.lock_id, "").await.unwrap();
    s.release(b.lock_id, "").await.unwrap();
    for r in ["a", "b"] {
        let st = client.status(r).await.unwrap();
        assert!(st.holders.is_empty(), "{st:?}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_wait_keeps_its_place_in_the_queue_across_a_leadership_transfer() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let (_holder, g, me) = contended(&client, "fifo", "streamer").await;
    let (s, first) = waiting_on_stream(&client, me.id(), "fifo").await;
    let other = client
        .open_session(Duration::from_secs(10), "second")
        .await
        .unwrap();
    let second = {
        let (client, id) = (client.clone(), other.id());
        tokio::spawn(async move {
            let wait = Some(Duration::from_secs(30));
            client
                .acquire(id, "fifo", LockMode::Exclusive, wait)
                .await
                .map(|r| r.fencing_token)
        })
    };
    eventually(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let st = client.status("fifo").await.unwrap();
            ok_if(st.waiters.len() == 2, "the second never queued")
        },
    )
    .await;
    let f = (1..=3).find(|&n| n != l).unwrap();
    c.servers[&l].locks.group.transfer_leader(f).await.unwrap();
    assert_eq!(c.leader().await, f);
    // The former leader refuses this as NOT_LEADER and ends the stream;
    // on the new leader the wait is sent again and taken over, not
    // withdrawn (the former leader abandons a broken stream's calls only
    // after a grace) and queued anew behind the second waiter.
    let quick = s
        .acquire("elsewhere", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    g.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the stream's wait was never answered")
        .unwrap()
        .expect("granted first");
    held_by(&client, "fifo", me.id()).await;
    assert!(!second.is_finished(), "the second waiter went first");
    s.release(granted.lock_id, "").await.unwrap();
    s.release(quick.lock_id, "").await.unwrap();
    let token = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second waiter was never answered")
        .unwrap()
        .expect("granted after the stream's release");
    assert!(token > granted.fencing_token);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_its_session() {
    let c = Cluster::start().await;
    c.leader().await;
    c.leases_on().await;
    let client = c.client();
    let me = client
        .open_session_unmanaged(Duration::from_secs(10), "short-lived")
        .await
        .unwrap()
        .session_id;
    let s = client.stream(me).await.unwrap();
    s.acquire("x", LockMode::Exclusive, Some(Duration::ZERO))
        .await
        .unwrap();
    client.close_session(me).await.unwrap();
    // The session's end is the operation's answer and the stream's: every
    // later operation sees it, none is retried.
    for _ in 0..2 {
        let e = s
            .acquire("y", LockMode::Exclusive, Some(Duration::ZERO))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(proto::status::reason(&e), "SESSION_NOT_FOUND");
    }
    c.stop().await;
}
