//! A cancelled Acquire never becomes a lock nobody knows about.
//!
//! A raw tonic client (not `dsync_client`, which could paper over server
//! gaps) sends many `Acquire`s and gives up on them at random moments — in
//! the proposal, in the queue, around the grant — three ways: dropping the
//! call (the stream is reset), dropping the call and its connection, and
//! letting a short gRPC deadline pass at the server. Half the resources
//! are free, half held by another session, which releases them all at the
//! end, so any wait left behind would then be granted to our session.
//!
//! Afterwards the session must hold exactly what its client was told it
//! got, and wait for nothing: every grant the client received is held, and
//! nothing is held whose response the client's connection never read.
//! Every call has its own connection, whose incoming bytes are recorded, so
//! the cases the contract (lock.proto) leaves open can be told apart: a
//! response the client's gRPC library had read whole when the caller gave
//! up, or one that had reached the client's host when it closed the
//! connection unread. The server may keep or release those; they are
//! counted.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use proto::lock::v1::lock_service_client::LockServiceClient;
use proto::lock::v1::*;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

mod common;
use common::Cluster;

/// Both directions of one client connection, as they crossed the socket.
#[derive(Default)]
struct Wire {
    received: Vec<u8>,
    sent: Vec<u8>,
    /// What had reached the client's host but was never read when the
    /// client closed the connection.
    unread: Vec<u8>,
}

/// A TCP stream that records every byte it reads and writes.
struct Recording {
    inner: TcpStream,
    log: Arc<Mutex<Wire>>,
}

impl AsyncRead for Recording {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = buf.filled()[before..].to_vec();
            self.log.lock().received.extend_from_slice(&new);
        }
        r
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let mut buf = [0u8; 4096];
        let mut log = self.log.lock();
        while let Ok(n @ 1..) = self.inner.try_read(&mut buf) {
            log.unread.extend_from_slice(&buf[..n]);
        }
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.log.lock().sent.extend_from_slice(&buf[..*n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A channel on a connection of its own whose incoming bytes are recorded.
async fn recorded_channel(addr: &str) -> (Channel, Arc<Mutex<Wire>>) {
    let log = Arc::new(Mutex::new(Wire::default()));
    let (a, l) = (addr.to_owned(), log.clone());
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let (a, l) = (a.clone(), l.clone());
            async move {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Ok::<_, io::Error>(TokioIo::new(Recording { inner: s, log: l }))
            }
        }))
        .await
        .unwrap();
    (ch, log)
}

/// The whole HTTP/2 frames in `bytes` (after `skip` bytes): kind, flags,
/// stream, payload. A frame cut short never crossed whole.
fn frames(bytes: &[u8], skip: usize) -> Vec<(u8, u8, u32, &[u8])> {
    let mut out = Vec::new();
    let mut i = skip;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        if i + 9 + len > bytes.len() {
            break;
        }
        let stream = u32::from_be_bytes([bytes[i + 5], bytes[i + 6], bytes[i + 7], bytes[i + 8]])
            & 0x7fff_ffff;
        out.push((
            bytes[i + 3],
            bytes[i + 4],
            stream,
            &bytes[i + 9..i + 9 + len],
        ));
        i += 9 + len;
    }
    out
}

/// Streams whose whole response with a message arrived: a non-empty DATA
/// frame, then a HEADERS frame ending the stream.
fn whole_responses(received: &[u8]) -> BTreeSet<u32> {
    let mut data = BTreeSet::new();
    let mut whole = BTreeSet::new();
    for (kind, flags, stream, payload) in frames(received, 0) {
        match kind {
            0 if stream != 0 && !payload.is_empty() => {
                data.insert(stream);
            }
            1 if flags & 0x1 != 0 && data.contains(&stream) => {
                whole.insert(stream);
            }
            _ => {}
        }
    }
    whole
}

/// The stream each request went out on, found by a name its message holds.
fn request_streams(sent: &[u8], names: &[String]) -> std::collections::HashMap<String, u32> {
    const PREFACE: usize = 24;
    let mut out = std::collections::HashMap::new();
    for (kind, _, stream, payload) in frames(sent, PREFACE) {
        if kind != 0 {
            continue;
        }
        for n in names {
            if payload.windows(n.len()).any(|w| w == n.as_bytes()) {
                out.insert(n.clone(), stream);
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Drop the call future: the client resets the stream.
    DropCall,
    /// Drop the call and its connection.
    Disconnect,
    /// A gRPC deadline the server enforces.
    Deadline,
}

#[derive(Debug)]
struct Attempt {
    resource: String,
    method: Method,
    /// The client's verdict: granted (lock id), refused, or given up.
    told: Option<Result<u64, tonic::Code>>,
    /// The whole response was read by the client's connection.
    received: bool,
}

type Raw = LockServiceClient<Channel>;

/// A cluster, the leader's address, a raw client to it, and two sessions:
/// "me" (whose calls are judged) and `other`.
async fn setup(other: &str) -> (Cluster, String, Raw, u64, u64) {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let addr = c.addrs[&l].clone();
    let mut admin = c.raw(l).await;
    let mut ids = Vec::new();
    for name in ["me", other] {
        let r = admin
            .open_session(OpenSessionRequest {
                ttl_ms: 60_000,
                client_name: name.into(),
                request_id: 0,
            })
            .await
            .unwrap();
        ids.push(r.into_inner().session_id);
    }
    (c, addr, admin, ids[0], ids[1])
}

/// The resources `session` holds once abandons have settled (the same
/// answer three times, 300 ms apart; at most 20 s), checking it waits for
/// nothing.
async fn settled(admin: &mut Raw, session: u64) -> BTreeSet<String> {
    let mut held = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stable = 0;
    loop {
        let waits = admin
            .list_sessions(ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions
            .iter()
            .find(|s| s.session_id == session)
            .expect("session alive")
            .waits;
        let locks: BTreeSet<String> = admin
            .list_locks(ListLocksRequest {
                page_size: 1000,
                page_token: String::new(),
                session_id: session,
            })
            .await
            .unwrap()
            .into_inner()
            .locks
            .into_iter()
            .map(|h| h.resource)
            .collect();
        stable = if waits == 0 && locks == held {
            stable + 1
        } else {
            0
        };
        held = locks;
        if stable >= 3 || Instant::now() > deadline {
            assert_eq!(waits, 0, "waits left behind");
            return held;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_acquires_leave_no_lock_or_wait_behind() {
    let (c, addr, mut admin, me, other) = setup("other").await;

    const ATTEMPTS: usize = 400;
    let kept_before = chassis::delivery::kept_unconfirmed();
    let started = Instant::now();
    let mut rng = rand::rng();
    let mut attempts = Vec::new();
    for i in 0..ATTEMPTS {
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        let held = i % 2 == 1;
        let resource = format!("{}/{i}", if held { "held" } else { "free" });
        if held {
            admin
                .acquire(AcquireRequest {
                    session_id: other,
                    resource: resource.clone(),
                    mode: LockMode::Exclusive as i32,
                    wait_timeout_ms: Some(0),
                    request_id: 0,
                })
                .await
                .unwrap();
        }
        let method = match i % 3 {
            0 => Method::DropCall,
            1 => Method::Disconnect,
            _ => Method::Deadline,
        };
        // A moment spread over the proposal (~1–2 ms with fsync) and the
        // start of the wait.
        let after = Duration::from_micros(rng.random_range(0..if held { 12_000 } else { 8_000 }));
        let (ch, log) = recorded_channel(&addr).await;
        let mut client = LockServiceClient::new(ch);
        let mut req = tonic::Request::new(AcquireRequest {
            session_id: me,
            resource: resource.clone(),
            mode: LockMode::Exclusive as i32,
            wait_timeout_ms: Some(30_000),
            request_id: rng.random::<u64>() | 1,
        });
        let told = if method == Method::Deadline {
            req.set_timeout(after.max(Duration::from_millis(1)));
            Some(
                client
                    .acquire(req)
                    .await
                    .map(|r| r.into_inner().lock_id)
                    .map_err(|e| e.code()),
            )
        } else {
            tokio::time::timeout(after, client.acquire(req))
                .await
                .ok()
                .map(|r| r.map(|r| r.into_inner().lock_id).map_err(|e| e.code()))
        };
        if method != Method::Disconnect {
            // Let whatever was in flight land before judging the wire.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(client);
        // The connection task closes the socket (recording its last bytes).
        let closed = Instant::now();
        while Arc::strong_count(&log) > 1 && closed.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The whole response reached the client: read by its connection,
        // or (a client that closed without reading) in its host's buffer.
        let received = {
            let w = log.lock();
            let mut all = w.received.clone();
            all.extend_from_slice(&w.unread);
            !whole_responses(&all).is_empty()
        };
        attempts.push(Attempt {
            resource,
            method,
            told,
            received,
        });
    }

    // Free every held resource: a wait left behind would be granted now.
    admin
        .release_all(ReleaseAllRequest { session_id: other })
        .await
        .unwrap();
    // Abandons are proposed in the background; wait until they settle.
    let held_now = settled(&mut admin, me).await;

    let granted = |a: &Attempt| matches!(a.told, Some(Ok(_)));
    let told: BTreeSet<String> = attempts
        .iter()
        .filter(|a| granted(a))
        .map(|a| a.resource.clone())
        .collect();
    let may_hold: BTreeSet<String> = attempts
        .iter()
        .filter(|a| granted(a) || a.received)
        .map(|a| a.resource.clone())
        .collect();
    // The one gap the contract names: a connection closed just as its
    // answer was written; the server keeps what it cannot prove unread
    // (and counts it). Anything else held is an orphan.
    let kept_unconfirmed = chassis::delivery::kept_unconfirmed() - kept_before;
    let unread_at_close: BTreeSet<&String> = attempts
        .iter()
        .filter(|a| a.method == Method::Disconnect && a.told.is_none() && !a.received)
        .map(|a| &a.resource)
        .filter(|r| held_now.contains(*r))
        .collect();
    let orphans: Vec<&String> = held_now
        .difference(&may_hold)
        .filter(|r| !unread_at_close.contains(r))
        .collect();
    let lost: Vec<&String> = told.difference(&held_now).collect();
    let open_case = |a: &Attempt| a.told.is_none() && a.received;
    let open_held = attempts
        .iter()
        .filter(|a| open_case(a) && held_now.contains(&a.resource))
        .count();
    let count = |f: &dyn Fn(&Attempt) -> bool| attempts.iter().filter(|a| f(a)).count();
    println!(
        "cancellation: {} attempts ({} drop, {} disconnect, {} deadline); told granted {}, \
         told refused {}, given up {} (of which the response had been read whole by the \
         client's connection: {}, {} kept, the rest released); connection closed as the grant \
         was written, kept unconfirmed: {}; orphans {}, lost {}",
        attempts.len(),
        count(&|a| a.method == Method::DropCall),
        count(&|a| a.method == Method::Disconnect),
        count(&|a| a.method == Method::Deadline),
        count(&|a| matches!(a.told, Some(Ok(_)))),
        count(&|a| matches!(a.told, Some(Err(_)))),
        count(&|a| a.told.is_none()),
        count(&open_case),
        open_held,
        unread_at_close.len(),
        orphans.len(),
        lost.len(),
    );
    for a in attempts.iter().filter(|a| orphans.contains(&&a.resource)) {
        println!("orphan: {a:?}");
    }
    assert!(attempts.len() >= 100, "too few attempts in the time bound");
    assert!(orphans.is_empty(), "locks nobody was told of: {orphans:?}");
    assert!(
        unread_at_close.len() as u64 <= kept_unconfirmed,
        "{} grants held after their connection closed, but the server kept only \
         {kept_unconfirmed} unconfirmed",
        unread_at_close.len()
    );
    assert!(lost.is_empty(), "grants sent but released: {lost:?}");
    // The moments were spread well: some calls were cut off, some granted.
    assert!(count(&|a| a.told.is_none() || matches!(a.told, Some(Err(_)))) > 10);
    assert!(count(&|a| matches!(a.told, Some(Ok(_)))) > 0);
    c.stop().await;
}

/// The same on one shared connection, as real clients use one: many calls
/// in flight at once, some cancelled, next to large ListLocks answers that
/// make HTTP/2 flow control split frames. The request each call sent is
/// found on the wire by its resource name, so "the client's connection read
/// the whole response" is judged per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sharing_a_connection_are_told_apart() {
    let (c, addr, mut admin, me, bulk) = setup("bulk").await;
    // Bulk locks with long names make each ListLocks page ~250 KB.
    for i in 0..500 {
        admin
            .acquire(AcquireRequest {
                session_id: bulk,
                resource: format!("bulk/{i:04}/{}", "x".repeat(480)),
                mode: LockMode::Shared as i32,
                wait_timeout_ms: Some(0),
                request_id: 0,
            })
            .await
            .unwrap();
    }
    let (ch, log) = recorded_channel(&addr).await;
    const TASKS: usize = 24;
    const ROUNDS: usize = 8;
    let reader = {
        let mut client = LockServiceClient::new(ch.clone());
        tokio::spawn(async move {
            for _ in 0..30 {
                let page = client
                    .list_locks(ListLocksRequest {
                        page_size: 1000,
                        page_token: String::new(),
                        session_id: 0,
                    })
                    .await
                    .unwrap();
                assert!(page.into_inner().locks.len() >= 500);
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut client = LockServiceClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random::<u64>() ^ t as u64);
            let mut out = Vec::new();
            for k in 0..ROUNDS {
                let resource = format!("shared/{t:03}/{k:03}");
                let call = client.acquire(AcquireRequest {
                    session_id: me,
                    resource: resource.clone(),
                    mode: LockMode::Exclusive as i32,
                    wait_timeout_ms: Some(30_000),
                    request_id: rng.random::<u64>() | 1,
                });
                // From 1 ms: a stream reset before the server accepted it
                // counts toward h2's Rapid Reset limit (20 per connection),
                // which answers a flood of them with GOAWAY; the test above
                // covers the first millisecond on connections of their own.
                let cancel = Duration::from_micros(rng.random_range(1_000..15_000));
                // Every call ends: a hung one (held-back trailers never
                // released) fails the test.
                let told = if k % 3 == 0 {
                    Some(
                        tokio::time::timeout(Duration::from_secs(20), call)
                            .await
                            .expect("a call hung")
                            .map(|r| r.into_inner().lock_id)
                            .map_err(|e| e.code()),
                    )
                } else {
                    tokio::time::timeout(cancel, call)
                        .await
                        .ok()
                        .map(|r| r.map(|r| r.into_inner().lock_id).map_err(|e| e.code()))
                };
                out.push((resource, told));
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .unwrap()
        .unwrap();
    // Let the last frames (and the PING rounds) cross before judging.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let held_now = settled(&mut admin, me).await;
    let names: Vec<String> = results.iter().map(|(r, _)| r.clone()).collect();
    let (streams, whole) = {
        let w = log.lock();
        (
            request_streams(&w.sent, &names),
            whole_responses(&w.received),
        )
    };
    let received = |r: &String| streams.get(r).is_some_and(|s| whole.contains(s));
    let told: BTreeSet<String> = results
        .iter()
        .filter(|(_, t)| matches!(t, Some(Ok(_))))
        .map(|(r, _)| r.clone())
        .collect();
    let orphans: Vec<&String> = held_now
        .iter()
        .filter(|r| !told.contains(*r) && !received(r))
        .collect();
    let lost: Vec<&String> = told.difference(&held_now).collect();
    let given_up = results.iter().filter(|(_, t)| t.is_none()).count();
    let open_case = results
        .iter()
        .filter(|(r, t)| t.is_none() && received(r))
        .count();
    println!(
        "shared connection: {} calls ({} found on the wire), told granted {}, given up {} \
         (response read whole by the connection first: {open_case}); orphans {}, lost {}",
        results.len(),
        streams.len(),
        told.len(),
        given_up,
        orphans.len(),
        lost.len()
    );
    // A call given up before its request left has no stream (and no lock).
    assert!(
        streams.len() * 2 > results.len(),
        "requests found on the wire"
    );
    assert!(orphans.is_empty(), "locks nobody was told of: {orphans:?}");
    assert!(lost.is_empty(), "grants told but released: {lost:?}");
    assert!(given_up > 10 && !told.is_empty());
    c.stop().await;
}
