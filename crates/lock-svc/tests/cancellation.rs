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
//! the one case the contract (lock.proto) leaves open can be told apart: a
//! response the client's gRPC library had read whole when the caller gave
//! up. The server may keep or release those; they are counted.

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
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

mod common;
use common::Cluster;

/// A TCP stream that records every byte it reads.
struct Recording {
    inner: TcpStream,
    log: Arc<Mutex<Vec<u8>>>,
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
            self.log.lock().extend_from_slice(&new);
        }
        r
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A channel on a connection of its own whose incoming bytes are recorded.
async fn recorded_channel(addr: &str) -> (Channel, Arc<Mutex<Vec<u8>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
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

/// Whether the server→client HTTP/2 bytes hold a complete response with a
/// message: a non-empty DATA frame, then a HEADERS frame ending the stream.
fn whole_response_on_wire(bytes: &[u8]) -> bool {
    let mut data = false;
    let mut i = 0;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        let (kind, flags) = (bytes[i + 3], bytes[i + 4]);
        let stream = u32::from_be_bytes([bytes[i + 5], bytes[i + 6], bytes[i + 7], bytes[i + 8]])
            & 0x7fff_ffff;
        if i + 9 + len > bytes.len() {
            break; // a frame cut short never reached the client whole
        }
        match kind {
            0 if stream != 0 && len > 0 => data = true,
            1 if stream != 0 && flags & 0x1 != 0 && data => return true,
            _ => {}
        }
        i += 9 + len;
    }
    false
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_acquires_leave_no_lock_or_wait_behind() {
    let c = Cluster::start().await;
    let l = c.leader().await;
    let addr = c.addrs[&l].clone();
    let mut admin = c.raw(l).await;
    let open = |name: &str| OpenSessionRequest {
        ttl_ms: 60_000,
        client_name: name.into(),
        request_id: 0,
    };
    let me = admin
        .open_session(open("me"))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let other = admin
        .open_session(open("other"))
        .await
        .unwrap()
        .into_inner()
        .session_id;

    const ATTEMPTS: usize = 400;
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
        let received = whole_response_on_wire(&log.lock());
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
    let mut held_now = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stable = 0;
    loop {
        let sessions = admin
            .list_sessions(ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions;
        let mine = sessions
            .iter()
            .find(|s| s.session_id == me)
            .expect("session alive");
        let locks: BTreeSet<String> = admin
            .list_locks(ListLocksRequest {
                page_size: 1000,
                page_token: String::new(),
                session_id: me,
            })
            .await
            .unwrap()
            .into_inner()
            .locks
            .into_iter()
            .map(|h| h.resource)
            .collect();
        stable = if mine.waits == 0 && locks == held_now {
            stable + 1
        } else {
            0
        };
        held_now = locks;
        if stable >= 3 || Instant::now() > deadline {
            assert_eq!(mine.waits, 0, "waits left behind");
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

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
    let orphans: Vec<&String> = held_now.difference(&may_hold).collect();
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
         client's connection: {}, {} kept, the rest released); orphans {}, lost {}",
        attempts.len(),
        count(&|a| a.method == Method::DropCall),
        count(&|a| a.method == Method::Disconnect),
        count(&|a| a.method == Method::Deadline),
        count(&|a| matches!(a.told, Some(Ok(_)))),
        count(&|a| matches!(a.told, Some(Err(_)))),
        count(&|a| a.told.is_none()),
        count(&open_case),
        open_held,
        orphans.len(),
        lost.len(),
    );
    for a in attempts.iter().filter(|a| orphans.contains(&&a.resource)) {
        println!("orphan: {a:?}");
    }
    assert!(attempts.len() >= 100, "too few attempts in the time bound");
    assert!(orphans.is_empty(), "locks nobody was told of: {orphans:?}");
    assert!(lost.is_empty(), "grants sent but released: {lost:?}");
    // The moments were spread well: some calls were cut off, some granted.
    assert!(count(&|a| a.told.is_none() || matches!(a.told, Some(Err(_)))) > 10);
    assert!(count(&|a| matches!(a.told, Some(Ok(_)))) > 0);
    c.stop().await;
}
