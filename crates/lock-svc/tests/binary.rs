//! Three `lock-svc` processes configured only by `DSYNC_*` environment
//! variables form a cluster on 127.0.0.1; the `dsync` CLI acquires, lists
//! and inspects locks through it, and a SIGTERMed leader hands over.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use consensus::testkit::{free_port, Procs};

/// Starts replica `i` (0-based) configured only by environment variables.
fn spawn_replica(i: usize, port: u16, peers: &[String], dir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lock-svc"))
        .env("DSYNC_NODE_ID", (i + 1).to_string())
        .env("DSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("DSYNC_PEERS", peers.join(","))
        .env("DSYNC_DATA_DIR", dir.join(format!("n{}", i + 1)))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// The `dsync` binary next to this test's `lock-svc` binary.
fn dsync_bin() -> std::path::PathBuf {
    let lock = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lock-svc"));
    lock.with_file_name("dsync")
}

fn dsync(endpoints: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(dsync_bin())
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("run dsync (built with `cargo build -p client`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn lock_svc_processes_form_a_cluster_usable_from_the_cli() {
    // `cargo test --workspace` (what `cargo xtask test` runs) builds every
    // binary of the workspace before running tests.
    assert!(
        dsync_bin().exists(),
        "{} is missing: run the tests with --workspace, or `cargo build -p client` first",
        dsync_bin().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let endpoints = endpoints.join(",");
    let mut procs = Procs(Vec::new());
    for (i, &p) in ports.iter().enumerate() {
        procs.0.push(spawn_replica(i, p, &peers, dir.path()));
    }
    // Wait until the cluster answers (a leader exists).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _) = dsync(&endpoints, &["session", "list"]);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "cluster never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out) = dsync(
        &endpoints,
        &["session", "open", "--ttl-ms", "60000", "--name", "cli-test"],
    );
    assert!(ok, "{out}");
    let sid = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("session="))
        .unwrap()
        .to_owned();
    let (ok, out) = dsync(
        &endpoints,
        &[
            "lock",
            "acquire",
            "orders/1",
            "--session",
            &sid,
            "--mode",
            "exclusive",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("fencing_token="), "{out}");
    let (ok, out) = dsync(&endpoints, &["lock", "status", "orders/1"]);
    assert!(
        ok && out.contains("mode=exclusive") && out.contains(&format!("session={sid}")),
        "{out}"
    );
    let (ok, out) = dsync(&endpoints, &["lock", "list"]);
    assert!(ok && out.contains("orders/1"), "{out}");
    // Try-lock from another session fails with a clear message, the
    // reason, and exit status 2 ("not obtained").
    let out = Command::new(dsync_bin())
        .args(["--endpoints", &endpoints])
        .args(["lock", "acquire", "orders/1", "--timeout-ms", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("busy") && text.contains("LOCK_BUSY"),
        "{text}"
    );
    // Bad input.
    let (ok, out) = dsync(
        &endpoints,
        &["lock", "release", "--session", &sid, "--lock-id", "987654"],
    );
    assert!(!ok && out.contains("NotFound"), "{out}");

    // SIGTERM every replica in turn; the others keep serving (the leader
    // transfers leadership first).
    for (i, &p) in ports.iter().enumerate() {
        let pid = procs.0[i].id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = procs.0[i].wait().unwrap();
        assert!(
            status.success(),
            "replica {} exited {status:?} on SIGTERM",
            i + 1
        );
        procs.0[i] = spawn_replica(i, p, &peers, dir.path());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out) = dsync(&endpoints, &["lock", "status", "orders/1"]);
            if ok {
                assert!(
                    out.contains(&format!("session={sid}")),
                    "lock survived restarts: {out}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster unavailable after restarting {}: {out}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (ok, out) = dsync(&endpoints, &["session", "keep-alive", &sid]);
        assert!(ok, "{out}");
    }
}
