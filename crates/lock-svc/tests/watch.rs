//! Leader watches: every replica streams who leads (admin `WatchLeader`),
//! and a lock client moves its calls to a new leader the moment any replica
//! reports one, not when its own connection to the old one times out.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{eventually, ok_if, Cluster};
use dsync_client::{LockClient, Options};
use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::admin_server::{Admin, AdminServer};
use proto::admin::v1::*;
use proto::common::v1::LeaderHint;
use tonic::{Request, Response, Status};

async fn watch(addr: &str) -> tonic::Streaming<WatchLeaderResponse> {
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    admin
        .watch_leader(WatchLeaderRequest { group_id: 0 })
        .await
        .unwrap()
        .into_inner()
}

/// The next event that names a leader (a follower may not know the new
/// leader yet when the watch opens: it reports leader 0 until it does).
async fn next(events: &mut tonic::Streaming<WatchLeaderResponse>) -> (u64, LeaderHint) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("no leader event within 10 s")
            .expect("the watch failed")
            .expect("the watch ended");
        let hint = ev.leader.expect("a leader hint");
        if hint.leader_id != 0 {
            return (ev.node_id, hint);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_streams_each_new_leader_with_its_term() {
    let mut c = Cluster::start().await;
    let l = c.leader().await;
    let f = (1..=3).find(|&n| n != l).unwrap();
    // A follower names the leader at the address the replicas know it by;
    // the leader names itself.
    let mut on_follower = watch(&c.addrs[&f]).await;
    let (node, first) = next(&mut on_follower).await;
    assert_eq!(node, f);
    assert_eq!(
        (first.leader_id, first.leader_addr.as_str()),
        (l, c.addrs[&l].as_str())
    );
    assert!(first.term > 0);
    let mut on_leader = watch(&c.addrs[&l]).await;
    let (node, own) = next(&mut on_leader).await;
    assert_eq!(node, l);
    assert_eq!(
        (own.leader_id, own.leader_addr.as_str(), own.term),
        (l, c.addrs[&l].as_str(), first.term)
    );

    // Leadership moves to f: both streams report f in a newer term.
    c.servers[&l].locks.group.transfer_leader(f).await.unwrap();
    for events in [&mut on_follower, &mut on_leader] {
        loop {
            let (_, h) = next(events).await;
            assert!(h.term >= first.term);
            if h.leader_id == f {
                assert!(h.term > first.term);
                assert_eq!(h.leader_addr, c.addrs[&f]);
                break;
            }
        }
    }

    // A replica that stops ends its watches with UNAVAILABLE.
    c.kill(f).await;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), on_follower.message())
            .await
            .expect("the watch outlived its replica")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without a status"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(end.code(), tonic::Code::Unavailable | tonic::Code::Unknown),
        "{end:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_learns_of_a_new_leader_without_a_failed_call() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let client = c.client();
    let s = client
        .open_session_unmanaged(Duration::from_secs(10), "watching")
        .await
        .unwrap();
    assert_eq!(client.conn().current(), c.addrs[&l]);
    let f = (1..=3).find(|&n| n != l).unwrap();
    c.servers[&l].locks.group.transfer_leader(f).await.unwrap();
    // No call is made meanwhile: the watches alone move the client.
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let learned = client.conn().current() == c.addrs[&f];
            ok_if(learned, format!("the client never learned of {f}"))
        },
    )
    .await;
    client.keep_alive(s.session_id).await.unwrap();
    c.stop().await;
}

/// A replica whose lock service takes calls and never answers them (a hung
/// process, or a leader cut off while its connections stay up), and whose
/// leader watch says what the test sends it.
#[derive(Clone)]
struct Hung {
    calls: Arc<AtomicUsize>,
}

impl tonic::server::NamedService for Hung {
    const NAME: &'static str = "dsync.lock.v1.LockService";
}

impl tower::Service<http::Request<tonic::body::Body>> for Hung {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
}

struct ScriptedAdmin {
    events: parking_lot::Mutex<
        Option<tokio::sync::mpsc::Receiver<Result<WatchLeaderResponse, Status>>>,
    >,
}

#[tonic::async_trait]
impl Admin for ScriptedAdmin {
    type WatchLeaderStream = chassis::admin::LeaderStream;

    async fn watch_leader(
        &self,
        _: Request<WatchLeaderRequest>,
    ) -> Result<Response<Self::WatchLeaderStream>, Status> {
        let rx = self
            .events
            .lock()
            .take()
            .ok_or_else(|| Status::unavailable("watched once"))?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn add_member(
        &self,
        _: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

type Events = tokio::sync::mpsc::Sender<Result<WatchLeaderResponse, Status>>;

/// A scripted replica on 127.0.0.1: its admin watch streams what is sent
/// on the returned channel; with `hung`, it also takes lock calls and never
/// answers them.
async fn scripted(hung: Option<Hung>) -> (String, Events, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (events, rx) = tokio::sync::mpsc::channel(4);
    let admin = AdminServer::new(ScriptedAdmin {
        events: parking_lot::Mutex::new(Some(rx)),
    });
    let routes = tonic::transport::Server::builder()
        .add_service(admin)
        .add_optional_service(hung);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = routes.serve_with_incoming(incoming).await;
    });
    (addr, events, server)
}

/// Runs `call` with a client whose first endpoint is a hung replica (its
/// lock service takes calls and never answers; its watch says nothing) and
/// whose second is a scripted one; once the hung replica holds the call,
/// the scripted one reports `l` elected in its current term, which the
/// hung one does not show. Answers the call's result (within 20 s) and how
/// many calls the hung replica took.
async fn moved_off_a_hung_replica<T, Fut>(
    c: &Cluster,
    l: u64,
    call: impl FnOnce(LockClient) -> Fut,
) -> (Result<T, Status>, usize)
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let (hung_addr, hung_events, hung) = scripted(Some(Hung {
        calls: calls.clone(),
    }))
    .await;
    let (other_addr, events, other) = scripted(None).await;
    // The hung replica's watch said something once (a replica never heard
    // from is not taken for gone), then fell silent.
    let term = c.servers[&l].locks.group.status().term;
    let older = WatchLeaderResponse {
        node_id: 98,
        leader: Some(LeaderHint {
            term: term - 1,
            ..LeaderHint::default()
        }),
    };
    hung_events.send(Ok(older)).await.unwrap();
    // On the hung replica alone, the call would wait a minute.
    let opts = Options {
        watch_leader: true,
        request_timeout: Duration::from_secs(60),
        retry_for: Duration::from_secs(60),
        ..Options::default()
    };
    let client = LockClient::with_options([hung_addr, other_addr], opts).unwrap();
    let running = tokio::spawn(call(client));
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let reached = calls.load(Ordering::SeqCst) > 0;
            ok_if(reached, "the call never reached the hung replica")
        },
    )
    .await;
    events
        .send(Ok(WatchLeaderResponse {
            node_id: 99,
            leader: Some(LeaderHint {
                leader_id: l,
                leader_addr: c.addrs[&l].clone(),
                group_id: 1,
                term,
            }),
        }))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the call stayed on the hung replica")
        .unwrap();
    hung.abort();
    other.abort();
    (result, calls.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stuck_on_a_silent_leader_moves_when_another_is_reported() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let (opened, calls) = moved_off_a_hung_replica(&c, l, |client| async move {
        client
            .open_session_unmanaged(Duration::from_secs(10), "moved")
            .await
    })
    .await;
    let s = opened.expect("served by the reported leader");
    assert_eq!(calls, 1);
    assert!(c.servers[&l]
        .locks
        .state
        .read()
        .sessions
        .contains_key(&s.session_id));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_stays_on_a_former_leader_that_follows_the_new_one() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    // A generous grace: the former leader's report of the new term may be
    // slow on a loaded machine; what is tested is that it keeps the call.
    let opts = Options {
        watch_leader: true,
        move_grace: Duration::from_secs(3),
        ..Options::default()
    };
    let a = c.client();
    let b = LockClient::with_options(c.endpoints(), opts).unwrap();
    let sa = a
        .open_session_unmanaged(Duration::from_secs(20), "holder")
        .await
        .unwrap();
    let sb = b
        .open_session_unmanaged(Duration::from_secs(20), "waiter")
        .await
        .unwrap();
    let held = a
        .acquire(sa.session_id, "r", dsync_client::LockMode::Exclusive, None)
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let b = b.clone();
        async move {
            b.acquire(
                sb.session_id,
                "r",
                dsync_client::LockMode::Exclusive,
                Some(Duration::from_secs(20)),
            )
            .await
        }
    });
    let t0 = Instant::now();
    while c.servers[&l].locks.state.read().waiters.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A leadership transfer: the former leader learns of the new one at
    // once, so the waiting call stays where it is (moving it would have
    // the former leader withdraw it as abandoned, and it would queue anew).
    let f = (1..=3).find(|&n| n != l).unwrap();
    c.servers[&l].locks.group.transfer_leader(f).await.unwrap();
    while b.conn().current() != c.addrs[&f] {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the watch never reported {f}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.release(sa.session_id, held.lock_id, "").await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter was never answered")
        .unwrap()
        .expect("granted");
    assert!(granted.fencing_token > held.fencing_token);
    for s in c.servers.values() {
        assert!(
            s.locks.state.read().abandoned.is_empty(),
            "a call was abandoned"
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_release_that_finds_the_lock_gone_succeeds() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let direct = c.client();
    let s = direct
        .open_session_unmanaged(Duration::from_secs(20), "releaser")
        .await
        .unwrap();
    let g = direct
        .acquire(s.session_id, "x", dsync_client::LockMode::Exclusive, None)
        .await
        .unwrap();
    // Released already (as a first attempt whose answer was lost would
    // have): a plain repeat is told LOCK_NOT_FOUND ...
    direct.release(s.session_id, g.lock_id, "").await.unwrap();
    let e = direct
        .release(s.session_id, g.lock_id, "")
        .await
        .unwrap_err();
    assert_eq!(proto::status::reason(&e), "LOCK_NOT_FOUND", "{e:?}");
    assert!(!dsync_client::maybe_repeated(&e));
    // ... but a release moved off a hung replica, whose attempt there may
    // have applied, takes LOCK_NOT_FOUND as done.
    let (released, _) = moved_off_a_hung_replica(&c, l, |client| async move {
        client.release(s.session_id, g.lock_id, "").await
    })
    .await;
    released.expect("LOCK_NOT_FOUND after a moved attempt counts as released");
    c.stop().await;
}
