//! Cache-svc over real sockets against a real `redis-server`: MESI states
//! as a client sees them, near caches, CAS, TTL, eviction, bad input, and
//! concurrent histories checked for linearizability per key — also while a
//! node is killed and restarted, partitioned, and while Redis restarts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_svc::config::CacheLimits;
use cache_svc::history::{check, Event, History, Op};
use common::{near_live, test_limits, write_back_limits, Cluster, Redis};
use dsync_client::cache::{CacheClient, SetOptions, Source};
use rand::{RngExt, SeedableRng};
use tonic::Code;

fn reason(s: &tonic::Status) -> String {
    proto::status::reason(s)
}

/// Which homes the test keys have, so a test can pick a key homed on a
/// given node.
fn key_homed_on(c: &Cluster, node: u64, prefix: &str) -> String {
    let ep = c.node(1).epoch();
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| ep.view.home(k.as_bytes()).map(|h| h.0) == Some(node))
        .unwrap()
}

fn states(c: &Cluster, id: u64) -> [u64; 3] {
    cache_svc::node::count_states(c.node(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mesi_states_follow_reads_and_writes() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let key = key_homed_on(&c, 1, "mesi");
    let (c1, c2, c3) = (c.client(1, false), c.client(2, false), c.client(3, false));

    // Absent: the first read loads from the store; node 2 gets it Exclusive.
    let (e, src) = c2.get_with_source(&key).await.unwrap();
    assert_eq!((e, src), (None, Source::Store));
    assert_eq!(states(&c, 2), [0, 1, 0], "S, E, M on node 2");
    // Served from node 2's line now.
    assert_eq!(c2.get_with_source(&key).await.unwrap().1, Source::Node);

    // A write through node 3: every copy invalidated, writer holds E.
    let v1 = c3.set(&key, "one").await.unwrap();
    assert_eq!(v1, 1);
    assert_eq!(states(&c, 2), [0, 0, 0]);
    assert_eq!(states(&c, 3), [0, 1, 0]);

    // Node 2 reads: node 3 downgraded to S, node 2 gets S from the peer
    // copy, the home keeps a copy of its own.
    let (e, src) = c2.get_with_source(&key).await.unwrap();
    assert_eq!(e.unwrap().value, Bytes::from("one"));
    assert_eq!(src, Source::Peer);
    assert_eq!(states(&c, 3), [1, 0, 0]);
    assert_eq!(states(&c, 2), [1, 0, 0]);
    assert_eq!(states(&c, 1), [1, 0, 0]);
    // Node 1 (the home) serves from its own copy.
    assert_eq!(c1.get_with_source(&key).await.unwrap().1, Source::Node);

    // Explicit invalidation names the nodes that dropped a copy.
    let mut dropped = c1.invalidate(&key).await.unwrap();
    dropped.sort();
    assert_eq!(dropped, vec![1, 2, 3]);
    for id in 1..=3 {
        assert_eq!(states(&c, id), [0, 0, 0], "node {id}");
    }
    // The value is still in the store.
    let (e, src) = c1.get_with_source(&key).await.unwrap();
    assert_eq!((e.unwrap().version, src), (1, Source::Store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_back_stores_behind_the_acknowledgement() {
    let redis = Redis::start();
    let limits = CacheLimits {
        write_behind: Duration::from_millis(1500),
        ..write_back_limits()
    };
    let c = Cluster::start(3, &redis.url(), limits).await;
    let key = key_homed_on(&c, 1, "wb");
    let (c2, c3) = (c.client(2, false), c.client(3, false));
    c2.set(&key, "dirty").await.unwrap();
    assert_eq!(states(&c, 2), [0, 0, 1], "writer holds M");
    // Not in Redis yet: acknowledged before the store write.
    let exists = |r: &Redis| r.raw(&[b"EXISTS", format!("dsync:{key}").as_bytes()]);
    assert_eq!(exists(&redis), b":0\r\n");
    // A read elsewhere: M → S, the value comes from the home's dirty copy.
    let (e, src) = c3.get_with_source(&key).await.unwrap();
    assert_eq!(e.unwrap().value, Bytes::from("dirty"));
    assert_eq!(src, Source::Peer);
    assert_eq!(states(&c, 2), [1, 0, 0]);
    // Writes coalesce; the last one is stored after the delay.
    c3.set(&key, "dirtier").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while exists(&redis) != b":1\r\n" {
        assert!(Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let raw = redis.raw(&[b"GET", format!("dsync:{key}").as_bytes()]);
    assert!(raw.ends_with(b"dirtier\r\n"), "{raw:?}");
    // The writer's line can be evicted or invalidated now: nothing is lost.
    c2.invalidate(&key).await.unwrap();
    assert_eq!(
        c2.get(&key).await.unwrap().unwrap().value,
        Bytes::from("dirtier")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_cache_is_invalidated_before_the_write_is_acknowledged() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let reader = c.client(1, true);
    let writer = c.client(3, true);
    near_live(&reader).await;
    near_live(&writer).await;
    for i in 0..50 {
        let key = format!("near-{}", i % 5);
        let v = format!("v{i}");
        writer.set(&key, v.clone()).await.unwrap();
        // Fill the reader's near cache, then hit it.
        assert_eq!(
            reader.get(&key).await.unwrap().unwrap().value,
            Bytes::from(v.clone())
        );
        let (e, src) = reader.get_with_source(&key).await.unwrap();
        assert_eq!(src, Source::Near, "round {i}");
        assert_eq!(e.unwrap().value, Bytes::from(v));
    }
    // Acknowledged write → the very next read, from the near cache or
    // not, sees it.
    for i in 0..50 {
        let key = format!("near-{}", i % 5);
        let v = format!("w{i}");
        writer.set(&key, v.clone()).await.unwrap();
        assert_eq!(
            reader.get(&key).await.unwrap().unwrap().value,
            Bytes::from(v)
        );
    }
    let st = reader.near_stats();
    assert!(st.hits >= 50 && st.invalidations >= 50, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_conflicts() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let (a, b) = (c.client(1, true), c.client(2, false));
    // if_version 0 = only if absent.
    let v = a
        .set_with(
            "cas",
            "first",
            SetOptions {
                if_version: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(v, 1);
    let err = b
        .set_with(
            "cas",
            "again",
            SetOptions {
                if_version: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "VERSION_MISMATCH");
    let info = proto::status::error_info(&err).unwrap();
    assert_eq!(info.metadata["current_version"], "1");

    // Two writers race on the same version: exactly one wins.
    let mut wins = 0;
    for round in 0..20 {
        let cur = a.get("cas").await.unwrap().unwrap().version;
        let (ra, rb) = tokio::join!(
            a.set_with(
                "cas",
                format!("a{round}"),
                SetOptions {
                    if_version: Some(cur),
                    ..Default::default()
                }
            ),
            b.set_with(
                "cas",
                format!("b{round}"),
                SetOptions {
                    if_version: Some(cur),
                    ..Default::default()
                }
            ),
        );
        let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ra:?} {rb:?}");
        wins += 1;
        for r in [ra, rb] {
            match r {
                Ok(v) => assert_eq!(v, cur + 1),
                Err(e) => assert_eq!(reason(&e), "VERSION_MISMATCH"),
            }
        }
    }
    assert_eq!(wins, 20);
    // Conditional delete.
    let cur = b.get("cas").await.unwrap().unwrap().version;
    assert_eq!(
        reason(&b.delete_if("cas", Some(cur + 5)).await.unwrap_err()),
        "VERSION_MISMATCH"
    );
    assert!(b.delete_if("cas", Some(cur)).await.unwrap());
    assert_eq!(a.get("cas").await.unwrap(), None);
    assert!(!a.delete("cas").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_expire_everywhere() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let (a, b) = (c.client(1, true), c.client(2, true));
    near_live(&a).await;
    a.set_with(
        "ttl",
        "short",
        SetOptions {
            ttl: Some(Duration::from_millis(400)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.set("keep", "long").await.unwrap();
    let e = b.get("ttl").await.unwrap().unwrap();
    assert!(e.ttl.unwrap() <= Duration::from_millis(400));
    assert!(a.get("ttl").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(a.get("ttl").await.unwrap(), None, "near cache / node copy");
    assert_eq!(b.get("ttl").await.unwrap(), None);
    assert_eq!(redis.raw(&[b"EXISTS", b"dsync:ttl"]), b":0\r\n");
    assert!(a.get("keep").await.unwrap().unwrap().ttl.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_under_the_memory_limit() {
    let redis = Redis::start();
    let limits = CacheLimits {
        memory_limit_bytes: 1 << 20,
        ..test_limits()
    };
    let c = Cluster::start(3, &redis.url(), limits).await;
    let cl = c.client(2, false);
    let value = vec![7u8; 16 << 10];
    for i in 0..256 {
        cl.set(format!("big-{i}"), value.clone()).await.unwrap();
    }
    // Every value is still readable: evicted lines reload from Redis.
    for i in 0..256 {
        let e = cl.get(format!("big-{i}")).await.unwrap().unwrap();
        assert_eq!(e.value.len(), value.len());
    }
    let st = cl.status().await.unwrap().stats.unwrap();
    assert!(st.evictions > 0, "{st:?}");
    assert!(st.size_bytes <= st.capacity_bytes, "{st:?}");
    assert!(st.misses > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_precise_statuses() {
    let redis = Redis::start();
    let limits = CacheLimits {
        max_value_bytes: 64 << 10,
        ..test_limits()
    };
    let c = Cluster::start(3, &redis.url(), limits).await;
    let cl = c.client(1, false);
    let e = cl.get("").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "EMPTY_KEY")
    );
    let e = cl.set("k".repeat(2000), "v").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "KEY_TOO_LARGE")
    );
    let e = cl.set("k", vec![0u8; (64 << 10) + 1]).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "VALUE_TOO_LARGE")
    );
    let e = cl
        .set_with(
            "k",
            "v",
            SetOptions {
                ttl: Some(Duration::from_secs(365 * 24 * 3600)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "TTL_OUT_OF_RANGE")
    );
    let keys: Vec<Vec<u8>> = (0..1001).map(|i| format!("k{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let e = cl.batch_get(&refs).await.unwrap_err();
    assert_eq!(reason(&e), "BATCH_TOO_LARGE");
    // A batch with one bad entry is refused whole: nothing applied.
    let r = cl
        .batch_set(vec![
            (b"ok-1".to_vec(), Bytes::from("a"), SetOptions::default()),
            (Vec::new(), Bytes::from("b"), SetOptions::default()),
        ])
        .await
        .unwrap_err();
    assert_eq!(reason(&r), "EMPTY_KEY");
    assert_eq!(cl.get("ok-1").await.unwrap(), None);
    // Batches: per-entry results.
    cl.set("b2", "x").await.unwrap();
    let r = cl
        .batch_set(vec![
            (b"b1".to_vec(), Bytes::from("1"), SetOptions::default()),
            (
                b"b2".to_vec(),
                Bytes::from("2"),
                SetOptions {
                    if_version: Some(0),
                    ..Default::default()
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(*r[0].as_ref().unwrap(), 1);
    assert_eq!(reason(r[1].as_ref().unwrap_err()), "VERSION_MISMATCH");
    let got = cl.batch_get(&[b"b1", b"b2", b"b3"]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, Bytes::from("1"));
    assert_eq!(got[1].as_ref().unwrap().value, Bytes::from("x"));
    assert!(got[2].is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_refuses_writes_and_keeps_coherent_reads() {
    let mut redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let cl = c.client(2, false);
    for i in 0..20 {
        cl.set(format!("r-{i}"), format!("v{i}")).await.unwrap();
    }
    redis.stop();
    // Cached lines still serve (node 2 holds what it wrote).
    for i in 0..20 {
        let e = cl.get(format!("r-{i}")).await.unwrap().unwrap();
        assert_eq!(e.value, Bytes::from(format!("v{i}")));
    }
    let e = cl.set("r-0", "lost?").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        ["STORE_UNAVAILABLE", "OUTCOME_UNKNOWN"].contains(&reason(&e).as_str()),
        "{e:?}"
    );
    // A miss cannot be served.
    let e = cl.get("never-written").await.unwrap_err();
    assert_eq!(reason(&e), "STORE_UNAVAILABLE");
    redis.restart();
    // Writes work again; every acknowledged write survived the restart.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match cl.set("after", "restart").await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for i in 1..20 {
        let raw = redis.raw(&[b"GET", format!("dsync:r-{i}").as_bytes()]);
        assert!(
            raw.windows(format!("v{i}").len())
                .any(|w| w == format!("v{i}").as_bytes()),
            "r-{i}: {raw:?}"
        );
    }
    let e = cl.get("r-0").await.unwrap().unwrap();
    assert!(e.value == "v0" || e.value == "lost?");
}

// ------------------------------------------------------ linearizability

/// One client's loop of random reads, writes, CAS and deletes over `keys`,
/// each recorded in `h`. Values are unique per write.
async fn client_loop(cl: CacheClient, id: u64, keys: usize, ops: usize, h: Arc<History>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id);
    let mut last_version: std::collections::HashMap<String, u64> = Default::default();
    for i in 0..ops {
        let key = format!("lin-{}", rng.random_range(0..keys));
        let dice = rng.random_range(0..100);
        let t0 = h.now();
        let record = |op: Op, complete: Option<u64>| {
            h.record(Event {
                client: id,
                key: key.clone().into_bytes(),
                op,
                invoke: t0,
                complete,
            })
        };
        if dice < 60 {
            if let Ok((e, src)) = cl.get_with_source(&key).await {
                if let Some(e) = &e {
                    last_version.insert(key.clone(), e.version);
                }
                SOURCES.lock().unwrap().insert((id, t0), format!("{src:?}"));
                record(
                    Op::Read {
                        observed: e.map(|e| e.value.to_vec()),
                    },
                    Some(h.now()),
                );
            }
        } else if dice < 90 {
            let value = format!("c{id}-{i}").into_bytes();
            let cas = dice >= 80;
            let opts = SetOptions {
                if_version: cas.then(|| last_version.get(&key).copied().unwrap_or(0)),
                ..Default::default()
            };
            match cl.set_with(&key, value.clone(), opts).await {
                Ok(v) => {
                    last_version.insert(key.clone(), v);
                    record(Op::Write { value }, Some(h.now()))
                }
                Err(e) if applied_unknown(&e) => record(Op::Write { value }, None),
                Err(_) => {}
            }
        } else {
            match cl.delete(&key).await {
                Ok(_) => record(Op::Delete, Some(h.now())),
                Err(e) if applied_unknown(&e) => record(Op::Delete, None),
                Err(_) => {}
            }
        }
        if i % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
        }
    }
}

static SOURCES: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Prints the failing key's events (with read sources) for diagnosis.
fn explain(events: &[Event], key: &[u8]) {
    let mut evs: Vec<&Event> = events.iter().filter(|e| e.key == key).collect();
    evs.sort_by_key(|e| e.invoke);
    let sources = SOURCES.lock().unwrap();
    for e in evs {
        let src = sources
            .get(&(e.client, e.invoke))
            .cloned()
            .unwrap_or_default();
        eprintln!(
            "  c{} {:>12} .. {:>12?} {:?} {}",
            e.client,
            e.invoke / 1000,
            e.complete.map(|c| c / 1000),
            e.op,
            src
        );
    }
}

/// Whether a failed write may still have happened: OUTCOME_UNKNOWN, or an
/// error that did not come from the service's own decision.
fn applied_unknown(e: &tonic::Status) -> bool {
    match e.code() {
        Code::InvalidArgument | Code::FailedPrecondition => false,
        Code::Unavailable => {
            let r = reason(e);
            r.is_empty() || r == "OUTCOME_UNKNOWN"
        }
        _ => true,
    }
}

/// Starts one `client_loop` per (node, near cache?) — each near cache
/// live first — recording into `h`.
async fn start_clients(
    c: &Cluster,
    clients: &[(u64, bool)],
    keys: usize,
    ops: usize,
    h: &Arc<History>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (i, &(node, near)) in clients.iter().enumerate() {
        let cl = c.client(node, near);
        if near {
            near_live(&cl).await;
        }
        tasks.push(tokio::spawn(client_loop(
            cl,
            i as u64 + 1,
            keys,
            ops,
            h.clone(),
        )));
    }
    tasks
}

/// Waits for the clients, then checks the history per key (printing the
/// failing key's events); answers how many operations were checked.
async fn checked(tasks: Vec<tokio::task::JoinHandle<()>>, h: &History) -> usize {
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
    }
    let events = h.events();
    match check(&events, &None) {
        Ok(n) => n,
        Err(v) => {
            explain(&events, &v.key);
            panic!("not linearizable: {v}")
        }
    }
}

async fn run_history(
    c: &Cluster,
    clients: Vec<(u64, bool)>,
    keys: usize,
    ops: usize,
    during: impl std::future::Future<Output = ()>,
) -> usize {
    let h = History::new();
    let tasks = start_clients(c, &clients, keys, ops, &h).await;
    during.await;
    checked(tasks, &h).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_through_nodes_and_near_caches_are_linearizable() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let clients = vec![
        (1, true),
        (1, false),
        (2, true),
        (2, true),
        (3, false),
        (3, true),
    ];
    let n = run_history(&c, clients, 4, 250, async {}).await;
    assert!(n > 1000, "only {n} operations checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_while_a_node_is_killed_and_restarted() {
    let redis = Redis::start();
    let mut c = Cluster::start(3, &redis.url(), test_limits()).await;
    let h = History::new();
    // Clients on nodes 1 and 2 only: node 3 is the one killed.
    let clients = [(1, true), (1, false), (2, true), (2, false)];
    let tasks = start_clients(&c, &clients, 4, 400, &h).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill(3).await;
    // Nodes 1 and 2 fence node 3 out once they miss it, and carry on.
    c.wait_ready(&[3]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.restart(3).await;
    c.wait_ready(&[]).await;
    let n = checked(tasks, &h).await;
    assert!(n > 500, "only {n} operations checked");
    // Node 3 is back and serves, with its own near-cache clients.
    let cl = c.client(3, true);
    near_live(&cl).await;
    cl.set("after-restart", "x").await.unwrap();
    assert_eq!(
        c.client(1, false)
            .get("after-restart")
            .await
            .unwrap()
            .unwrap()
            .value,
        Bytes::from("x")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_while_a_node_is_partitioned() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let faults = c.faults.clone();
    let clients = vec![(1, true), (2, true), (2, false), (3, true), (3, false)];
    let during = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Node 3 keeps its clients but loses every peer (Raft included):
        // it must stop serving before the others rely on its being gone.
        faults.isolate(3, &[1, 2]);
        c.wait_ready(&[3]).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        faults.heal();
    };
    let n = run_history(&c, clients, 4, 300, during).await;
    assert!(n > 500, "only {n} operations checked");
    c.wait_ready(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_while_redis_restarts() {
    let mut redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), test_limits()).await;
    let h = History::new();
    let tasks = start_clients(&c, &[(1, true), (2, false), (3, true)], 4, 300, &h).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    let n = checked(tasks, &h).await;
    assert!(n > 300, "only {n} operations checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_survives_a_killed_node() {
    let mut c = Cluster::start(3, "embedded", test_limits()).await;
    let cl = c.client(1, true);
    near_live(&cl).await;
    for i in 0..50 {
        cl.set(format!("e-{i}"), format!("v{i}")).await.unwrap();
    }
    // The embedded store's leader may be any node; kill node 2 and check
    // nothing acknowledged is lost and the cache keeps working.
    c.kill(2).await;
    c.wait_ready(&[2]).await;
    let other = c.client(3, false);
    for i in 0..50 {
        let e = other.get(format!("e-{i}")).await.unwrap().unwrap();
        assert_eq!(e.value, Bytes::from(format!("v{i}")));
    }
    other.set("e-0", "new").await.unwrap();
    assert_eq!(
        cl.get("e-0").await.unwrap().unwrap().value,
        Bytes::from("new")
    );
    c.restart(2).await;
    c.wait_ready(&[]).await;
    let back = c.client(2, false);
    assert_eq!(
        back.get("e-1").await.unwrap().unwrap().value,
        Bytes::from("v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_back_mode_is_linearizable_too() {
    let redis = Redis::start();
    let c = Cluster::start(3, &redis.url(), write_back_limits()).await;
    let clients = vec![(1, true), (2, false), (2, true), (3, true)];
    let n = run_history(&c, clients, 3, 250, async {}).await;
    assert!(n > 600, "only {n} operations checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_behind_the_cache() {
    let rc = common::RedisCluster::start();
    let c = Cluster::start(3, &rc.url(), test_limits()).await;
    let cl = c.client(1, false);
    for i in 0..60 {
        cl.set(format!("rc-{i}"), format!("v{i}")).await.unwrap();
    }
    // Dropped from every cache: reads come back from the Redis Cluster,
    // whose keys landed on all three masters.
    for i in 0..60 {
        cl.invalidate(format!("rc-{i}")).await.unwrap();
        let (e, src) = c
            .client(2, false)
            .get_with_source(format!("rc-{i}"))
            .await
            .unwrap();
        assert_eq!(e.unwrap().value, Bytes::from(format!("v{i}")));
        assert_eq!(src, Source::Store);
    }
    let per_master: Vec<usize> = rc
        .nodes
        .iter()
        .map(|n| {
            let raw = n.raw(&[b"DBSIZE"]);
            String::from_utf8_lossy(&raw[1..]).trim().parse().unwrap()
        })
        .collect();
    assert!(
        per_master.iter().all(|n| *n > 0),
        "keys on every master: {per_master:?}"
    );
    assert_eq!(per_master.iter().sum::<usize>(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_ahead_keeps_hot_lines_past_their_line_ttl() {
    let redis = Redis::start();
    let limits = CacheLimits {
        line_ttl: Duration::from_millis(1000),
        refresh_ahead: 0.5,
        ..test_limits()
    };
    let c = Cluster::start(3, &redis.url(), limits).await;
    let cl = c.client(2, false);
    cl.set("hot", "v").await.unwrap();
    cl.set("cold", "v").await.unwrap();
    // Read "hot" often for three line TTLs: after its first fill every
    // read is a hit on node 2, since refreshes reload it before it ends.
    let deadline = Instant::now() + Duration::from_millis(3000);
    let mut sources = Vec::new();
    while Instant::now() < deadline {
        sources.push(cl.get_with_source("hot").await.unwrap().1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let misses = sources.iter().filter(|s| **s != Source::Node).count();
    let st = cl.status().await.unwrap().stats.unwrap();
    assert!(st.refreshes >= 2, "{st:?}");
    assert_eq!(misses, 0, "{sources:?}");
    // "cold", not read, ran out: its next read misses.
    assert_ne!(cl.get_with_source("cold").await.unwrap().1, Source::Node);
}
