//! Minimal NATS JetStream client for the queue-svc vs. JetStream benchmark.
//!
//! Self-contained on purpose (tokio + serde_json + std only) so the workspace needs no NATS
//! crate; include it with `#[path = "nats.rs"] mod nats;`. Tested against nats-server 2.9.10
//! (Debian package) running as a 3-node JetStream cluster (see [`server_args`]).
//!
//! Design, and why:
//! * One TCP connection with `TCP_NODELAY`; we do our own batching, so Nagle would only add
//!   latency.
//! * Writes: callers append protocol bytes to a shared `Vec<u8>` under a short std mutex and wake
//!   a writer task, which swaps the buffer out and writes it with one `write_all`. Whatever
//!   concurrent callers queue while a write is in flight goes out together in the next one, so
//!   there is no syscall per message, and once the two buffers have grown nothing is allocated per
//!   message on the write side.
//! * Reads: a reader task over a 256 KiB `BufReader`: `read_until(b'\n')` for control lines,
//!   `read_exact` for payloads. It answers server PINGs and completes our PINGs in order.
//! * Request/reply: one wildcard subscription `_INBOX.<random>.*` (sid 1). Each request uses the
//!   reply subject `_INBOX.<random>.<id>` with a numeric `<id>`, so the reader routes a reply by
//!   parsing a `u64` instead of allocating and hashing the subject string.
//! * Pull fetches: JetStream delivers pulled messages with the message's *original* subject in the
//!   MSG line (e.g. `bench.x`), not the reply inbox; only the sid tells which subscription they
//!   belong to. So each fetch subscribes its own inbox `_INBOX.<random>.f.<id>` with sid `<id>`
//!   (the extra token keeps it from also matching the wildcard, which would deliver everything
//!   twice) and the reader routes by sid.
//!
//! Not implemented (not needed by the bench): reconnects, TLS, auth, JetStream domains, flow
//! control, idle heartbeats. A dead connection fails every pending and later call.

// The bench uses only part of the API; keep the module warning-free wherever it is included.
#![allow(dead_code)]

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

/// Timeout for the handshake, JetStream API calls, PubAcks and `flush`.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Big enough that a burst of pulled 100-byte messages needs few read syscalls.
const READ_BUF: usize = 256 * 1024;
/// Callers wait while this many bytes are queued for the writer, so a producer that outruns the
/// socket cannot grow the buffer without bound.
const HIGH_WATER: usize = 8 << 20;
/// The writer drops a buffer that grew past this instead of keeping the capacity forever.
const KEEP_CAPACITY: usize = 4 << 20;
/// sid of the wildcard reply subscription; per-fetch subscriptions use ids, which start at 2.
const INBOX_SID: u64 = 1;
/// Refuse absurd sizes in MSG lines instead of trying to allocate them.
const MAX_MSG: usize = 64 << 20;
/// Extra time a waiting fetch gives the server beyond `expires` before giving up locally.
const FETCH_GRACE: Duration = Duration::from_secs(2);

/// One NATS connection. Cheap to share (`&Nats` / `Arc<Nats>`) between tasks: every method takes
/// `&self` and waits only for its own replies.
pub struct Nats {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

struct Shared {
    out: Mutex<Out>,
    wake_writer: Notify,
    /// Signalled whenever the writer has emptied the buffer (and on close).
    drained: Notify,
    routes: Mutex<HashMap<u64, Route>>,
    next_id: AtomicU64,
    /// `_INBOX.<random>.` — request reply subjects are this plus an id.
    inbox: String,
    /// `_INBOX.<random>.f.` — fetch inboxes are this plus an id (also their sid).
    fetch_inbox: String,
    max_payload: usize,
}

/// Everything whose order must match the byte stream lives under one lock: PONGs complete the
/// oldest PING, so a PING's waiter must be queued exactly where its bytes are.
struct Out {
    buf: Vec<u8>,
    pongs: VecDeque<oneshot::Sender<()>>,
    /// Why the connection died; once set, nothing more is queued.
    closed: Option<String>,
}

enum Route {
    /// A single reply (request, PubAck); removed by the reader when it arrives.
    Once(oneshot::Sender<Msg>),
    /// Many messages (a fetch); removed by the fetch when done.
    Many(mpsc::UnboundedSender<Msg>),
}

struct Msg {
    reply: Option<String>,
    /// Status line from the headers (`NATS/1.0 404 No Messages`), if any.
    status: Option<Status>,
    payload: Vec<u8>,
}

struct Status {
    code: u16,
    text: String,
}

impl Drop for Nats {
    /// Kills both tasks, which closes the socket. Bytes still queued (e.g. fire-and-forget acks)
    /// are lost: call [`Nats::flush`] first if they matter.
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Nats {
    /// Connects to `host:port` (a `nats://` prefix is accepted) and completes the handshake.
    pub async fn connect(addr: &str) -> io::Result<Nats> {
        let addr = addr.strip_prefix("nats://").unwrap_or(addr);
        timeout(API_TIMEOUT, Self::handshake(addr))
            .await
            .map_err(|_| timed_out("connect"))?
    }

    async fn handshake(addr: &str) -> io::Result<Nats> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUF, rd);
        let mut line = Vec::with_capacity(1024);

        read_line(&mut rd, &mut line).await?;
        let info = line.strip_prefix(b"INFO ").ok_or_else(|| {
            invalid(format!(
                "expected INFO, got {:?}",
                String::from_utf8_lossy(&line)
            ))
        })?;
        let info: Value = serde_json::from_slice(info).map_err(invalid)?;
        // Pull-consumer termination (404/408) and no-responders (503) arrive as header statuses.
        if info["headers"] != Value::Bool(true) {
            return Err(invalid("server does not support headers"));
        }
        let max_payload = info["max_payload"]
            .as_u64()
            .map_or(1 << 20, |n| usize::try_from(n).unwrap_or(usize::MAX));

        wr.write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\
              \"no_responders\":true,\"lang\":\"rust\",\"version\":\"0\"}\r\nPING\r\n",
        )
        .await?;
        // The PONG proves CONNECT was accepted (errors would come first as -ERR).
        loop {
            read_line(&mut rd, &mut line).await?;
            match line.as_slice() {
                b"PONG" => break,
                b"PING" => wr.write_all(b"PONG\r\n").await?,
                l if l.starts_with(b"-ERR") => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        String::from_utf8_lossy(l).into_owned(),
                    ))
                }
                _ => {} // +OK, INFO
            }
        }

        let nonce = format!("{:016x}{:016x}", random_u64(), random_u64());
        let inbox = format!("_INBOX.{nonce}.");
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(format!("SUB {inbox}* {INBOX_SID}\r\n").as_bytes());
        let shared = Arc::new(Shared {
            out: Mutex::new(Out {
                buf,
                pongs: VecDeque::new(),
                closed: None,
            }),
            wake_writer: Notify::new(),
            drained: Notify::new(),
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(INBOX_SID + 1),
            fetch_inbox: format!("{inbox}f."),
            inbox,
            max_payload,
        });
        // The SUB is already queued, and the connection preserves order, so the server knows the
        // inbox before it sees any request that replies to it.
        shared.wake_writer.notify_one();
        let reader = tokio::spawn(read_task(rd, shared.clone()));
        let writer = tokio::spawn(write_task(wr, shared.clone()));
        Ok(Nats {
            shared,
            reader,
            writer,
        })
    }

    /// Core NATS request: publishes `payload` with a unique reply subject and returns the first
    /// reply's payload. No responders (503) is `ErrorKind::NotFound`.
    pub async fn request(
        &self,
        subject: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        let msg = self.request_msg(subject, payload, timeout).await?;
        match msg.status {
            Some(st) if st.code == 503 => Err(no_responders(subject)),
            _ => Ok(msg.payload),
        }
    }

    async fn request_msg(&self, subject: &str, payload: &[u8], wait: Duration) -> io::Result<Msg> {
        self.check_pub(subject, payload)?;
        let sh = &*self.shared;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&sh.routes).insert(id, Route::Once(tx));
        let mut guard = RouteGuard::new(sh, id, 1);
        sh.enqueue(|out| put_pub(&mut out.buf, subject, Some((&sh.inbox, id)), payload))
            .await?;
        let msg = match timeout(wait, rx).await {
            Ok(Ok(msg)) => msg,
            Ok(Err(_)) => return Err(sh.closed_err()),
            Err(_) => return Err(timed_out(subject)),
        };
        guard.disarm(); // the reader removed the route when it delivered
        Ok(msg)
    }

    /// Creates a file-backed stream. Exists already (any config) counts as success.
    pub async fn create_stream(
        &self,
        name: &str,
        subjects: &[&str],
        replicas: u32,
    ) -> io::Result<()> {
        self.create_stream_with(name, subjects, replicas, API_TIMEOUT)
            .await
    }

    async fn create_stream_with(
        &self,
        name: &str,
        subjects: &[&str],
        replicas: u32,
        wait: Duration,
    ) -> io::Result<()> {
        let body = json!({
            "name": name,
            "subjects": subjects,
            "storage": "file",
            "retention": "limits",
            "discard": "old",
            "num_replicas": replicas,
        });
        let v = self
            .js_api(&format!("$JS.API.STREAM.CREATE.{name}"), &body, wait)
            .await?;
        // 10058 "stream name already in use" means it exists with a different config (an
        // identical one just succeeds). Accepted so that setup is idempotent; check
        // `stream_info` if the existing config matters.
        js_result(&v, |code, desc| {
            code == 10058 || desc.contains("already in use")
        })
    }

    /// [`Nats::create_stream`], retried until it succeeds or `within` has passed. A fresh cluster
    /// answers with errors (no meta leader yet, not enough peers, no responders, timeouts) for a
    /// few seconds after start; this is the way to wait for it.
    pub async fn create_stream_retrying(
        &self,
        name: &str,
        subjects: &[&str],
        replicas: u32,
        within: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            // Short per-attempt timeout so one lost request does not eat the whole budget; a
            // create that timed out but went through later is "already in use" next time.
            let err = match self
                .create_stream_with(name, subjects, replicas, Duration::from_secs(2))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + Duration::from_millis(250) >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Deletes a stream; a missing stream counts as success.
    pub async fn delete_stream(&self, name: &str) -> io::Result<()> {
        let v = self
            .js_api(
                &format!("$JS.API.STREAM.DELETE.{name}"),
                &Value::Null,
                API_TIMEOUT,
            )
            .await?;
        js_result(&v, |code, _| code == 10059) // stream not found
    }

    /// `$JS.API.STREAM.INFO` as raw JSON (e.g. `["cluster"]["leader"]`, `["state"]["messages"]`).
    pub async fn stream_info(&self, name: &str) -> io::Result<Value> {
        let v = self
            .js_api(
                &format!("$JS.API.STREAM.INFO.{name}"),
                &Value::Null,
                API_TIMEOUT,
            )
            .await?;
        js_value(v)
    }

    /// `$JS.API.CONSUMER.INFO` as raw JSON (e.g. `["num_ack_pending"]`, `["num_pending"]`).
    pub async fn consumer_info(&self, stream: &str, durable: &str) -> io::Result<Value> {
        let v = self
            .js_api(
                &format!("$JS.API.CONSUMER.INFO.{stream}.{durable}"),
                &Value::Null,
                API_TIMEOUT,
            )
            .await?;
        js_value(v)
    }

    /// Publishes and waits for the JetStream PubAck; returns the stream sequence. Safe to call
    /// concurrently from many tasks; concurrent publishes share write syscalls.
    pub async fn publish(&self, subject: &str, payload: &[u8]) -> io::Result<u64> {
        let msg = self.request_msg(subject, payload, API_TIMEOUT).await?;
        pub_ack_seq(subject, &msg)
    }

    /// Publishes a batch pipelined (all PUBs written, then all acks awaited); returns sequences
    /// in order. Fails on the first negative or missing ack (each ack gets [`API_TIMEOUT`] from
    /// the previous one, so large batches are fine as long as acks keep coming).
    pub async fn publish_batch(&self, subject: &str, payloads: &[Vec<u8>]) -> io::Result<Vec<u64>> {
        for p in payloads {
            self.check_pub(subject, p)?;
        }
        let n = payloads.len() as u64;
        if n == 0 {
            return Ok(Vec::new());
        }
        let sh = &*self.shared;
        let base = sh.next_id.fetch_add(n, Ordering::Relaxed);
        let mut rxs = Vec::with_capacity(payloads.len());
        {
            let mut routes = lock(&sh.routes);
            for id in base..base + n {
                let (tx, rx) = oneshot::channel();
                routes.insert(id, Route::Once(tx));
                rxs.push(rx);
            }
        }
        let mut guard = RouteGuard::new(sh, base, n);
        sh.enqueue(|out| {
            for (id, p) in (base..).zip(payloads) {
                put_pub(&mut out.buf, subject, Some((&sh.inbox, id)), p);
            }
        })
        .await?;
        let mut seqs = Vec::with_capacity(payloads.len());
        for rx in rxs {
            let msg = match timeout(API_TIMEOUT, rx).await {
                Ok(Ok(msg)) => msg,
                Ok(Err(_)) => return Err(sh.closed_err()),
                Err(_) => return Err(timed_out(subject)),
            };
            seqs.push(pub_ack_seq(subject, &msg)?);
        }
        guard.disarm();
        Ok(seqs)
    }

    /// Creates (or confirms) a durable pull consumer: explicit ack, deliver all,
    /// max_ack_pending 100000, ack_wait 30 s. Uses the 2.9 `CONSUMER.DURABLE.CREATE` API.
    /// An existing consumer with the same name counts as success.
    pub async fn create_pull_consumer(&self, stream: &str, durable: &str) -> io::Result<()> {
        let body = json!({
            "stream_name": stream,
            "config": {
                "durable_name": durable,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "max_ack_pending": 100_000,
                "ack_wait": 30_000_000_000u64,
            },
        });
        let v = self
            .js_api(
                &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}"),
                &body,
                API_TIMEOUT,
            )
            .await?;
        js_result(&v, |_, desc| desc.contains("already"))
    }

    /// Fetches up to `batch` messages; returns `(payload, ack subject)` pairs.
    ///
    /// Returns as soon as something is available rather than waiting for a full batch: first a
    /// `no_wait` pull takes whatever is pending (the server ends it with a 404/408 status when it
    /// runs out). Only if that is empty does it long-poll for one message for up to `expires`,
    /// then take whatever else is pending with another `no_wait` pull. (A plain waiting pull for
    /// `batch` would hold partial batches until `expires`, and giving up on it locally would
    /// strand its later deliveries until ack_wait.) Empty result = nothing within `expires`.
    pub async fn fetch(
        &self,
        stream: &str,
        durable: &str,
        batch: usize,
        expires: Duration,
    ) -> io::Result<Vec<(Vec<u8>, String)>> {
        let mut got = Vec::new();
        if batch == 0 {
            return Ok(got);
        }
        self.pull(stream, durable, batch, None, &mut got).await?;
        if !got.is_empty() || expires.is_zero() {
            return Ok(got);
        }
        self.pull(stream, durable, 1, Some(expires), &mut got)
            .await?;
        if !got.is_empty() && batch > 1 {
            self.pull(stream, durable, batch - 1, None, &mut got)
                .await?;
        }
        Ok(got)
    }

    /// One `$JS.API.CONSUMER.MSG.NEXT` request; `expires: None` means `no_wait`.
    async fn pull(
        &self,
        stream: &str,
        durable: &str,
        batch: usize,
        expires: Option<Duration>,
        got: &mut Vec<(Vec<u8>, String)>,
    ) -> io::Result<()> {
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}");
        check_subject(&subject)?;
        let sh = &*self.shared;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&sh.routes).insert(id, Route::Many(tx));
        let _guard = RouteGuard::new(sh, id, 1).with_unsub();
        let (body, deadline) = match expires {
            Some(e) => (
                format!(r#"{{"batch":{batch},"expires":{}}}"#, e.as_nanos()),
                Instant::now() + e + FETCH_GRACE,
            ),
            None => (
                format!(r#"{{"batch":{batch},"no_wait":true}}"#),
                Instant::now() + API_TIMEOUT,
            ),
        };
        sh.enqueue(|out| {
            let b = &mut out.buf;
            b.extend_from_slice(b"SUB ");
            b.extend_from_slice(sh.fetch_inbox.as_bytes());
            put_u64(b, id);
            b.push(b' ');
            put_u64(b, id);
            b.extend_from_slice(b"\r\n");
            put_pub(b, &subject, Some((&sh.fetch_inbox, id)), body.as_bytes());
        })
        .await?;

        let want = got.len() + batch;
        while got.len() < want {
            let msg = match timeout_at(deadline, rx.recv()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => return Err(sh.closed_err()),
                // Server should have ended the pull by now; return what we have.
                Err(_) => break,
            };
            match msg.status {
                None => {
                    let reply = msg
                        .reply
                        .ok_or_else(|| invalid("pulled message without ack subject"))?;
                    got.push((msg.payload, reply));
                }
                // 100: heartbeat / flow control (not requested). 404 No Messages, 408 Request
                // Timeout: the pull is over. 409 (e.g. leadership change) after some messages:
                // keep them. 503: no such consumer (its leader is what answers MSG.NEXT).
                Some(st) => match st.code {
                    100 => {}
                    404 | 408 => break,
                    409 if !got.is_empty() => break,
                    503 => return Err(no_responders(&subject)),
                    code => {
                        return Err(io::Error::other(format!(
                            "pull {stream}.{durable}: {code} {}",
                            st.text
                        )))
                    }
                },
            }
        }
        Ok(())
    }

    /// Acks (`+ACK`) each reply subject, fire-and-forget: queued and written by the next writer
    /// pass without waiting for any answer. Follow with [`Nats::flush`] to know the server has
    /// processed them.
    pub async fn ack(&self, replies: &[String]) -> io::Result<()> {
        for r in replies {
            check_subject(r)?;
        }
        self.shared
            .enqueue(|out| {
                for r in replies {
                    put_pub(&mut out.buf, r, None, b"+ACK");
                }
            })
            .await
    }

    /// Acks and waits until the server confirmed each ack (pipelined, like `publish_batch`).
    pub async fn ack_sync(&self, replies: &[String]) -> io::Result<()> {
        for r in replies {
            check_subject(r)?;
        }
        let n = replies.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let sh = &*self.shared;
        let base = sh.next_id.fetch_add(n, Ordering::Relaxed);
        let mut rxs = Vec::with_capacity(replies.len());
        {
            let mut routes = lock(&sh.routes);
            for id in base..base + n {
                let (tx, rx) = oneshot::channel();
                routes.insert(id, Route::Once(tx));
                rxs.push(rx);
            }
        }
        let mut guard = RouteGuard::new(sh, base, n);
        sh.enqueue(|out| {
            for (id, r) in (base..).zip(replies) {
                put_pub(&mut out.buf, r, Some((&sh.inbox, id)), b"+ACK");
            }
        })
        .await?;
        for rx in rxs {
            match timeout(API_TIMEOUT, rx).await {
                Ok(Ok(msg)) => match msg.status {
                    Some(st) if st.code == 503 => return Err(no_responders("ack")),
                    _ => {}
                },
                Ok(Err(_)) => return Err(sh.closed_err()),
                Err(_) => return Err(timed_out("ack")),
            }
        }
        guard.disarm();
        Ok(())
    }

    /// Round trip to the server (PING/PONG): everything queued before has been written and
    /// processed by the server when this returns.
    pub async fn flush(&self) -> io::Result<()> {
        let sh = &*self.shared;
        let (tx, rx) = oneshot::channel();
        sh.enqueue(|out| {
            out.pongs.push_back(tx);
            out.buf.extend_from_slice(b"PING\r\n");
        })
        .await?;
        match timeout(API_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(sh.closed_err()),
            Err(_) => Err(timed_out("flush")),
        }
    }

    /// JetStream API request; returns the JSON reply, which may be an `{"error":..}` object.
    async fn js_api(&self, subject: &str, body: &Value, wait: Duration) -> io::Result<Value> {
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).map_err(invalid)?
        };
        let resp = self.request(subject, &body, wait).await?;
        serde_json::from_slice(&resp).map_err(invalid)
    }

    fn check_pub(&self, subject: &str, payload: &[u8]) -> io::Result<()> {
        check_subject(subject)?;
        // The server would answer an oversized PUB by closing the connection.
        if payload.len() > self.shared.max_payload {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "payload of {} bytes exceeds server max_payload {}",
                    payload.len(),
                    self.shared.max_payload
                ),
            ));
        }
        Ok(())
    }
}

/// nats-server (2.9) arguments for node `id` (1..=3) of the local 3-node JetStream cluster
/// `bench`: client port `client_port`, cluster (route) port `cluster_ports[id - 1]`, routes to
/// the other two, JetStream data under `store_dir/n<id>` (so all nodes can share one base
/// directory; the server creates it). Everything binds to 127.0.0.1.
pub fn server_args(
    id: usize,
    client_port: u16,
    cluster_ports: &[u16; 3],
    store_dir: &Path,
) -> Vec<String> {
    assert!((1..=3).contains(&id), "node id must be 1..=3, got {id}");
    let routes: Vec<String> = cluster_ports
        .iter()
        .enumerate()
        .filter(|&(i, _)| i + 1 != id)
        .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
        .collect();
    [
        "--server_name".to_owned(),
        format!("n{id}"),
        "-a".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        client_port.to_string(),
        "-js".to_owned(),
        "-sd".to_owned(),
        store_dir.join(format!("n{id}")).display().to_string(),
        "--cluster_name".to_owned(),
        "bench".to_owned(),
        "--cluster".to_owned(),
        format!("nats://127.0.0.1:{}", cluster_ports[id - 1]),
        "--routes".to_owned(),
        routes.join(","),
    ]
    .into()
}

/// Stream sequence of a pulled message, from its ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`; newer
/// servers add `<domain>.<account hash>.` in front and a token at the end).
pub fn ack_stream_seq(ack_subject: &str) -> Option<u64> {
    let tokens: Vec<&str> = ack_subject.split('.').collect();
    let idx = match tokens.len() {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    tokens[idx].parse().ok()
}

impl Shared {
    /// Queues bytes for the writer, first waiting while the queue is over [`HIGH_WATER`].
    async fn enqueue(&self, f: impl FnOnce(&mut Out)) -> io::Result<()> {
        loop {
            // Created before the check so a drain that happens in between is not missed.
            let drained = self.drained.notified();
            {
                let out = lock(&self.out);
                if out.closed.is_some() || out.buf.len() < HIGH_WATER {
                    break;
                }
            }
            drained.await;
        }
        self.enqueue_now(f)
    }

    /// Queues bytes without waiting (for the reader's PONGs and for UNSUBs from `Drop`).
    fn enqueue_now(&self, f: impl FnOnce(&mut Out)) -> io::Result<()> {
        {
            let mut out = lock(&self.out);
            if let Some(reason) = &out.closed {
                return Err(closed_err(reason));
            }
            f(&mut out);
        }
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Marks the connection dead and fails every waiter (dropping their senders).
    fn fail(&self, reason: String) {
        let pongs = {
            let mut out = lock(&self.out);
            out.closed.get_or_insert(reason);
            out.buf = Vec::new();
            std::mem::take(&mut out.pongs)
        };
        let routes = std::mem::take(&mut *lock(&self.routes));
        drop((pongs, routes));
        self.drained.notify_waiters();
        self.wake_writer.notify_one();
    }

    fn closed_err(&self) -> io::Error {
        closed_err(
            lock(&self.out)
                .closed
                .as_deref()
                .unwrap_or("unknown reason"),
        )
    }

    /// Hands a message to whoever waits for route `key`; drops it if nobody does (a reply that
    /// arrived after its caller timed out).
    fn dispatch(&self, key: u64, msg: Msg) {
        let mut routes = lock(&self.routes);
        let Entry::Occupied(entry) = routes.entry(key) else {
            return;
        };
        match entry.get() {
            Route::Many(tx) => {
                let _ = tx.send(msg);
            }
            Route::Once(_) => {
                if let Route::Once(tx) = entry.remove() {
                    drop(routes);
                    let _ = tx.send(msg);
                }
            }
        }
    }
}

/// Removes routes `base..base+n` when a call ends early (error, timeout, or its future dropped),
/// and for fetches also unsubscribes the per-fetch inbox.
struct RouteGuard<'a> {
    sh: &'a Shared,
    base: u64,
    n: u64,
    armed: bool,
    unsub: bool,
}

impl<'a> RouteGuard<'a> {
    fn new(sh: &'a Shared, base: u64, n: u64) -> Self {
        RouteGuard {
            sh,
            base,
            n,
            armed: true,
            unsub: false,
        }
    }

    fn with_unsub(mut self) -> Self {
        self.unsub = true;
        self
    }

    /// For `Once` routes the reader already removed every entry; skip the extra lock.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        {
            let mut routes = lock(&self.sh.routes);
            for id in self.base..self.base + self.n {
                routes.remove(&id);
            }
        }
        if self.unsub {
            let id = self.base;
            // Fails only if the connection is dead, and then the subscription is gone anyway.
            let _ = self.sh.enqueue_now(|out| {
                out.buf.extend_from_slice(b"UNSUB ");
                put_u64(&mut out.buf, id);
                out.buf.extend_from_slice(b"\r\n");
            });
        }
    }
}

async fn write_task(mut wr: OwnedWriteHalf, sh: Arc<Shared>) {
    let mut local = Vec::with_capacity(64 * 1024);
    loop {
        {
            let mut out = lock(&sh.out);
            if out.closed.is_some() {
                return;
            }
            // Swap rather than copy: callers keep appending into the other buffer while this
            // one is being written.
            std::mem::swap(&mut out.buf, &mut local);
        }
        if local.is_empty() {
            sh.wake_writer.notified().await;
            continue;
        }
        if let Err(e) = wr.write_all(&local).await {
            sh.fail(format!("write failed: {e}"));
            return;
        }
        local.clear();
        if local.capacity() > KEEP_CAPACITY {
            local = Vec::with_capacity(64 * 1024);
        }
        sh.drained.notify_waiters();
    }
}

async fn read_task(mut rd: BufReader<OwnedReadHalf>, sh: Arc<Shared>) {
    let err = match read_loop(&mut rd, &sh).await {
        Err(e) => e,
        Ok(never) => match never {},
    };
    sh.fail(err.to_string());
}

async fn read_loop(rd: &mut BufReader<OwnedReadHalf>, sh: &Shared) -> io::Result<Infallible> {
    let mut line = Vec::with_capacity(1024);
    let mut last_err = String::new();
    loop {
        if let Err(e) = read_line(rd, &mut line).await {
            // A fatal -ERR is followed by the server closing the socket; report the -ERR.
            return Err(if last_err.is_empty() {
                e
            } else {
                io::Error::new(io::ErrorKind::ConnectionAborted, last_err)
            });
        }
        let (is_hmsg, args) = if let Some(a) = line.strip_prefix(b"MSG ") {
            (false, a)
        } else if let Some(a) = line.strip_prefix(b"HMSG ") {
            (true, a)
        } else {
            match line.as_slice() {
                b"PING" => sh.enqueue_now(|out| out.buf.extend_from_slice(b"PONG\r\n"))?,
                b"PONG" => {
                    if let Some(tx) = lock(&sh.out).pongs.pop_front() {
                        let _ = tx.send(());
                    }
                }
                l if l.starts_with(b"-ERR") => last_err = String::from_utf8_lossy(l).into_owned(),
                _ => {} // +OK, async INFO (cluster topology updates)
            }
            continue;
        };

        let head = parse_msg_args(args, is_hmsg, sh.inbox.as_bytes())
            .ok_or_else(|| invalid(format!("bad line {:?}", String::from_utf8_lossy(&line))))?;
        let mut payload = vec![0u8; head.total + 2];
        rd.read_exact(&mut payload).await?;
        payload.truncate(head.total);
        let status = if head.hdr > 0 {
            let status = parse_status(&payload[..head.hdr]);
            payload.drain(..head.hdr);
            status
        } else {
            None
        };
        if let Some(key) = head.key {
            let reply = head.reply.map(|r| String::from_utf8_lossy(r).into_owned());
            sh.dispatch(
                key,
                Msg {
                    reply,
                    status,
                    payload,
                },
            );
        }
    }
}

struct MsgHead<'a> {
    /// Route id: from the subject for the wildcard inbox, else the sid.
    key: Option<u64>,
    reply: Option<&'a [u8]>,
    hdr: usize,
    total: usize,
}

/// Parses `<subject> <sid> [reply] <size>` (MSG) or `<subject> <sid> [reply] <hdr> <total>`
/// (HMSG) without allocating.
fn parse_msg_args<'a>(args: &'a [u8], is_hmsg: bool, inbox: &[u8]) -> Option<MsgHead<'a>> {
    let mut tok: [&[u8]; 5] = [&[]; 5];
    let mut n = 0;
    for t in args.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
        *tok.get_mut(n)? = t;
        n += 1;
    }
    let sizes = if is_hmsg { 2 } else { 1 };
    let reply = match n.checked_sub(sizes)? {
        2 => None,
        3 => Some(tok[2]),
        _ => return None,
    };
    let (hdr, total) = if is_hmsg {
        (parse_usize(tok[n - 2])?, parse_usize(tok[n - 1])?)
    } else {
        (0, parse_usize(tok[n - 1])?)
    };
    if hdr > total || total > MAX_MSG {
        return None;
    }
    let sid = parse_u64(tok[1])?;
    let key = if sid == INBOX_SID {
        tok[0].strip_prefix(inbox).and_then(parse_u64)
    } else {
        Some(sid)
    };
    Some(MsgHead {
        key,
        reply,
        hdr,
        total,
    })
}

/// Status from a header block's first line, e.g. `NATS/1.0 404 No Messages`.
fn parse_status(headers: &[u8]) -> Option<Status> {
    let first = headers.split(|&b| b == b'\n').next()?;
    let rest = first.strip_prefix(b"NATS/1.0")?;
    let rest = String::from_utf8_lossy(rest);
    let rest = rest.trim();
    let code: u16 = rest.get(..3)?.parse().ok()?;
    Some(Status {
        code,
        text: rest[3..].trim().to_owned(),
    })
}

/// Stream sequence from a PubAck (`{"stream":"S","seq":N}`), or the error it carries.
fn pub_ack_seq(subject: &str, msg: &Msg) -> io::Result<u64> {
    if let Some(st) = &msg.status {
        if st.code == 503 {
            return Err(no_responders(subject));
        }
    }
    // Fast path without building a JSON tree: a PubAck is tiny and this runs per message.
    let p = &msg.payload;
    if let Some(i) = find(p, b"\"seq\":") {
        let digits = &p[i + 6..];
        let end = digits.iter().position(|b| !b.is_ascii_digit());
        if let Some(seq) = parse_u64(&digits[..end.unwrap_or(digits.len())]) {
            return Ok(seq);
        }
    }
    let v: Value = serde_json::from_slice(p).map_err(invalid)?;
    Err(js_error(&v).unwrap_or_else(|| {
        invalid(format!(
            "unexpected PubAck {:?}",
            String::from_utf8_lossy(p)
        ))
    }))
}

/// `Ok` unless the reply is an error other than the ones `ok_if(err_code, description)` accepts.
fn js_result(v: &Value, ok_if: impl Fn(u64, &str) -> bool) -> io::Result<()> {
    let Some(e) = v.get("error") else {
        return Ok(());
    };
    let code = e["err_code"].as_u64().unwrap_or(0);
    let desc = e["description"].as_str().unwrap_or("");
    if ok_if(code, desc) {
        Ok(())
    } else {
        Err(js_error(v).expect("has error"))
    }
}

fn js_value(v: Value) -> io::Result<Value> {
    match js_error(&v) {
        Some(e) => Err(e),
        None => Ok(v),
    }
}

fn js_error(v: &Value) -> Option<io::Error> {
    let e = v.get("error")?;
    let code = e["code"].as_u64().unwrap_or(0);
    let msg = format!(
        "jetstream error {} (err_code {}): {}",
        code,
        e["err_code"].as_u64().unwrap_or(0),
        e["description"].as_str().unwrap_or("?")
    );
    let kind = if code == 404 {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::Other
    };
    Some(io::Error::new(kind, msg))
}

/// `PUB <subject> [<reply prefix><id>] <len>\r\n<payload>\r\n`
fn put_pub(buf: &mut Vec<u8>, subject: &str, reply: Option<(&str, u64)>, payload: &[u8]) {
    buf.extend_from_slice(b"PUB ");
    buf.extend_from_slice(subject.as_bytes());
    buf.push(b' ');
    if let Some((prefix, id)) = reply {
        buf.extend_from_slice(prefix.as_bytes());
        put_u64(buf, id);
        buf.push(b' ');
    }
    put_u64(buf, payload.len() as u64);
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
}

/// Decimal digits without going through `fmt` (hot path: every PUB).
fn put_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn parse_usize(s: &[u8]) -> Option<usize> {
    usize::try_from(parse_u64(s)?).ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A space or line break would corrupt the protocol stream.
fn check_subject(s: &str) -> io::Result<()> {
    if s.is_empty() || s.bytes().any(|b| b <= b' ') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid subject {s:?}"),
        ));
    }
    Ok(())
}

/// Reads one protocol line into `line`, without the trailing CRLF.
async fn read_line(rd: &mut BufReader<OwnedReadHalf>, line: &mut Vec<u8>) -> io::Result<()> {
    line.clear();
    if rd.read_until(b'\n', line).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "server closed the connection",
        ));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(())
}

/// Random enough for unique inbox names without a rand crate: `RandomState` keys come from the
/// OS once per process and differ per instance; time and pid separate processes further.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (plain inserts/removes).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what}: timed out"))
}

fn no_responders(subject: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no responders for {subject} (no stream/consumer listening?)"),
    )
}

fn closed_err(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("nats connection closed: {reason}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const INBOX: &[u8] = b"_INBOX.abc.";

    #[test]
    fn parses_msg_lines() {
        let h = parse_msg_args(b"_INBOX.abc.42 1 7", false, INBOX).unwrap();
        assert_eq!((h.key, h.reply, h.hdr, h.total), (Some(42), None, 0, 7));
        // Pulled message: original subject, routed by its sid, with an ack reply.
        let h = parse_msg_args(b"bench.x 9 $JS.ACK.S.C.1.5.5.1.0 100", false, INBOX).unwrap();
        assert_eq!(h.key, Some(9));
        assert_eq!(h.reply, Some(&b"$JS.ACK.S.C.1.5.5.1.0"[..]));
        let h = parse_msg_args(b"_INBOX.abc.f.7 7 28 28", true, INBOX).unwrap();
        assert_eq!((h.key, h.hdr, h.total), (Some(7), 28, 28));
        // Not one of our inboxes on sid 1: no route, but still parsed (payload must be read).
        let h = parse_msg_args(b"other.3 1 5", false, INBOX).unwrap();
        assert_eq!(h.key, None);
        for bad in [&b""[..], b"x", b"x 1", b"x 1 a b c d", b"x 1 -5", b"x y 5"] {
            assert!(parse_msg_args(bad, false, INBOX).is_none(), "{bad:?}");
        }
        assert!(
            parse_msg_args(b"x 1 9 5", true, INBOX).is_none(),
            "hdr > total"
        );
        assert!(parse_msg_args(b"x 1 99999999999999999999", false, INBOX).is_none());
    }

    #[test]
    fn parses_status_and_pub_acks() {
        let st = parse_status(b"NATS/1.0 404 No Messages\r\n\r\n").unwrap();
        assert_eq!((st.code, st.text.as_str()), (404, "No Messages"));
        assert_eq!(parse_status(b"NATS/1.0 503\r\n\r\n").unwrap().code, 503);
        assert!(parse_status(b"NATS/1.0\r\nFoo: bar\r\n\r\n").is_none());

        let msg = |p: &[u8]| Msg {
            reply: None,
            status: None,
            payload: p.to_vec(),
        };
        let ok = msg(br#"{"stream":"BENCH","seq":12345}"#);
        assert_eq!(pub_ack_seq("s", &ok).unwrap(), 12345);
        let dup = msg(br#"{"stream":"BENCH","seq":7,"duplicate":true}"#);
        assert_eq!(pub_ack_seq("s", &dup).unwrap(), 7);
        let err = msg(
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        let e = pub_ack_seq("s", &err).unwrap_err();
        assert!(e.to_string().contains("maximum messages exceeded"), "{e}");
    }

    #[test]
    fn formats_pubs() {
        let mut b = Vec::new();
        put_pub(&mut b, "a.b", Some(("_INBOX.x.", 0)), b"hi");
        put_pub(&mut b, "c", None, b"");
        put_u64(&mut b, u64::MAX);
        assert_eq!(
            b,
            b"PUB a.b _INBOX.x.0 2\r\nhi\r\nPUB c 0\r\n\r\n18446744073709551615".to_vec()
        );
        assert!(check_subject("a b").is_err());
        assert!(check_subject("a\r\n").is_err());
        assert!(check_subject("$JS.ACK.S.C.1.2.3.4.5").is_ok());
    }

    #[test]
    fn ack_subject_seq() {
        let v1 = "$JS.ACK.BENCH.C.1.17.17.1700000000000000000.0";
        assert_eq!(ack_stream_seq(v1), Some(17));
        let v2 = "$JS.ACK.dom.hash.BENCH.C.1.17.17.1700000000.0.rnd";
        assert_eq!(ack_stream_seq(v2), Some(17));
        assert_eq!(ack_stream_seq("$JS.ACK.x"), None);
    }

    #[test]
    fn server_args_route_to_the_others() {
        let s = server_args(2, 4222, &[6001, 6002, 6003], Path::new("/d")).join(" ");
        assert!(s.contains("--server_name n2"), "{s}");
        assert!(s.contains("-sd /d/n2"), "{s}");
        assert!(s.contains("--cluster nats://127.0.0.1:6002"), "{s}");
        let routes = "--routes nats://127.0.0.1:6001,nats://127.0.0.1:6003";
        assert!(s.contains(routes), "{s}");
    }
}
