//! `cargo xtask e2e`: a three-replica lock-svc cluster in Docker, driven by
//! the Rust client under faults.
//!
//! The replicas run as containers named like a StatefulSet's pods
//! (`lock-svc-0..2`) on a private `--internal` network, configured exactly as
//! in Kubernetes (pod name, replica count, peer template). The load driver
//! (`dsync-e2e load`, see crates/e2e) runs in a fourth container on the same
//! network. Meanwhile this orchestrator:
//! 1. disconnects the leader's container from the network: the majority
//!    must elect a new leader and keep granting locks; the isolated replica
//!    must refuse a write; then reconnects it and waits for it to converge;
//! 2. `docker kill`s a replica and starts it again from its volume.
//!
//! The driver checks mutual exclusion, fencing-token order and that every
//! acknowledged lock survived; this side reports how soon grants resumed
//! after the partition.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::image::tag;
use crate::Result;

const REPLICAS: usize = 3;
const PORT: u16 = 7001;

/// One replica's line of `dsync cluster status`.
#[derive(Debug)]
struct Row {
    node: usize,
    role: String,
    commit: u64,
    applied: u64,
}

struct Env {
    net: String,
    prefix: String,
}

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The longest gap between consecutive grants (wall-clock ms, sorted) that
/// ends within 10 s after `at`, counting the time from `at` to the first
/// grant after it.
fn longest_pause(times: &[u64], at: u64) -> u64 {
    let mut prev = at;
    let mut longest = 0;
    for &t in times.iter().filter(|&&t| t > at && t <= at + 10_000) {
        longest = longest.max(t - prev);
        prev = t;
    }
    if prev == at {
        10_000
    } else {
        longest
    }
}

/// True if a Docker engine answers.
pub fn available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Env {
    fn pod(&self, i: usize) -> String {
        format!("lock-svc-{i}")
    }
    fn container(&self, i: usize) -> String {
        format!("{}-lock-svc-{i}", self.prefix)
    }
    fn endpoints(&self) -> String {
        (0..REPLICAS)
            .map(|i| format!("{}:{PORT}", self.pod(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_replica(&self, i: usize) -> Result {
        let name = self.container(i);
        let pod = self.pod(i);
        let vol = format!("{name}-data:/var/lib/dsync");
        let template = format!("DSYNC_PEER_TEMPLATE=lock-svc-{{ordinal}}:{PORT}");
        let pod_env = format!("DSYNC_POD_NAME={pod}");
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &pod,
            "--network",
            &self.net,
            "--network-alias",
            &pod,
            "-v",
            &vol,
            "-e",
            &pod_env,
            "-e",
            "DSYNC_REPLICAS=3",
            "-e",
            &template,
            "-e",
            &format!(
                "RUST_LOG={}",
                std::env::var("DSYNC_E2E_RUST_LOG").unwrap_or_else(|_| "warn".into())
            ),
            &tag("lock-svc"),
        ])?;
        Ok(())
    }

    /// `dsync cluster status` from inside replica `via`, as (node id, role)
    /// rows of the replicas it reached.
    fn status(&self, via: usize) -> Vec<Row> {
        let out = docker(&[
            "exec",
            &self.container(via),
            "/usr/local/bin/dsync",
            "--endpoints",
            &self.endpoints(),
            "cluster",
            "status",
        ])
        .unwrap_or_default();
        out.lines()
            .skip(1)
            .filter_map(|l| {
                // replica node role group term leader commit applied last …
                let cols: Vec<&str> = l.split_whitespace().collect();
                Some(Row {
                    node: cols.get(1)?.parse().ok()?,
                    role: cols.get(2)?.to_string(),
                    commit: cols.get(6)?.parse().ok()?,
                    applied: cols.get(7)?.parse().ok()?,
                })
            })
            .collect()
    }

    fn leader(&self, via: &[usize], within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            for &v in via {
                if let Some(r) = self.status(v).into_iter().find(|r| r.role == "leader") {
                    return Ok(r.node - 1);
                }
            }
            if Instant::now() > deadline {
                return Err("no leader found".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn cleanup(&self) {
        let _ = docker(&["rm", "-f", &format!("{}-driver", self.prefix)]);
        for i in 0..REPLICAS {
            let _ = docker(&["rm", "-f", &self.container(i)]);
            let _ = docker(&["volume", "rm", "-f", &format!("{}-data", self.container(i))]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

pub fn run(seconds: u64) -> Result {
    if !available() {
        return Err("no Docker engine answers `docker info`".into());
    }
    crate::image::build_all()?;
    let prefix = format!("dsync-e2e-{}", std::process::id());
    let env = Env {
        net: format!("{prefix}-net"),
        prefix,
    };
    env.cleanup();
    let res = scenario(&env, seconds);
    if res.is_err() || std::env::var_os("DSYNC_E2E_LOGS").is_some() {
        let _ = Command::new("docker")
            .args(["logs", &format!("{}-driver", env.prefix)])
            .status();
        for i in 0..REPLICAS {
            eprintln!("--- {} ---", env.container(i));
            let _ = Command::new("docker")
                .args(["logs", "--tail", "60", &env.container(i)])
                .status();
        }
    }
    env.cleanup();
    res
}

fn scenario(env: &Env, seconds: u64) -> Result {
    let t0 = Instant::now();
    let say = |msg: String| println!("e2e [{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
    // A private network: containers reach each other, nothing else.
    docker(&["network", "create", "--internal", &env.net])?;
    for i in 0..REPLICAS {
        env.start_replica(i)?;
    }
    let leader = env.leader(&[0, 1, 2], Duration::from_secs(30))?;
    say(format!("cluster up, leader {}", env.pod(leader)));
    let driver = format!("{}-driver", env.prefix);
    let secs = seconds.to_string();
    docker(&[
        "run",
        "-d",
        "--name",
        &driver,
        "--network",
        &env.net,
        &tag("e2e"),
        "load",
        "--endpoints",
        &env.endpoints(),
        "--seconds",
        &secs,
    ])?;
    let driver_end = wall_ms() + seconds * 1000;
    std::thread::sleep(Duration::from_secs(seconds / 6));

    // 1. Partition the leader away.
    let old = env.leader(&[0, 1, 2], Duration::from_secs(10))?;
    let cut_at = wall_ms();
    docker(&["network", "disconnect", &env.net, &env.container(old)])?;
    say(format!(
        "disconnected leader {} from the network",
        env.pod(old)
    ));
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let new = env.leader(&others, Duration::from_secs(10))?;
    say(format!("{} leads the majority", env.pod(new)));
    // The isolated replica refuses a write.
    let refused = Command::new("docker")
        .args([
            "exec",
            &env.container(old),
            "/usr/local/bin/dsync",
            "--retry-ms",
            "2000",
            "--endpoints",
            &format!("127.0.0.1:{PORT}"),
            "session",
            "open",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if refused.status.success() {
        return Err(format!(
            "the isolated replica accepted a write: {}",
            String::from_utf8_lossy(&refused.stdout)
        ));
    }
    say(format!(
        "isolated replica refused a write: {}",
        String::from_utf8_lossy(&refused.stderr).trim()
    ));
    std::thread::sleep(Duration::from_secs(2));
    let committed_while_cut = env
        .status(new)
        .into_iter()
        .find(|r| r.node == new + 1)
        .map_or(0, |r| r.commit);
    if committed_while_cut == 0 {
        return Err(format!("could not read {}'s commit index", env.pod(new)));
    }
    let pod = env.pod(old);
    docker(&[
        "network",
        "connect",
        "--alias",
        &pod,
        &env.net,
        &env.container(old),
    ])?;
    say(format!("reconnected {}", env.pod(old)));
    // Converges: it follows the new leader and applies everything the
    // majority had committed while it was cut off.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = env.status(old);
        let me = st.iter().find(|r| r.node == old + 1);
        if me.is_some_and(|r| r.role == "follower" && r.applied >= committed_while_cut) {
            say(format!(
                "{} rejoined as a follower and applied up to {} (the commit index reached while it was cut off)",
                env.pod(old),
                committed_while_cut
            ));
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not converge: {st:?}", env.pod(old)));
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // 2. Kill a replica outright and restart it from its volume.
    let victim = env.leader(&[0, 1, 2], Duration::from_secs(10))?;
    let kill_at = wall_ms();
    if kill_at + 10_000 > driver_end {
        return Err(format!(
            "the driver ends too soon to observe the kill; run with more than {seconds} s"
        ));
    }
    docker(&["kill", &env.container(victim)])?;
    say(format!("docker kill {}", env.pod(victim)));
    std::thread::sleep(Duration::from_secs(2));
    docker(&["start", &env.container(victim)])?;
    say(format!("restarted {}", env.pod(victim)));

    // The driver finishes and reports.
    let code = docker(&["wait", &driver])?;
    let out = docker(&["logs", &driver])?;
    let report: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("grant_times_ms="))
        .collect();
    println!("e2e driver:\n  {}", report.join("\n  "));
    // Service after the partition: first grant after the cut.
    let times: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("grant_times_ms="))
        .unwrap_or("")
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        // Grants per second over the run, for the record.
        let mut per_sec = vec![0u32; ((last - first) / 1000 + 1) as usize];
        for t in &times {
            per_sec[((t - first) / 1000) as usize] += 1;
        }
        let marks = |at: u64| at.saturating_sub(*first) / 1000;
        say(format!(
            "grants per second (partition at second {}, kill at second {}): {:?}",
            marks(cut_at),
            marks(kill_at),
            per_sec
        ));
    }
    for (what, at) in [("leader partitioned", cut_at), ("replica killed", kill_at)] {
        let pause = longest_pause(&times, at);
        say(format!(
            "{what}: longest pause between lock grants in the 10 s after: {pause} ms"
        ));
        // Liveness bound, generous on purpose: the figure itself is recorded
        // in BENCHMARKS.md; this only catches a cluster that stopped serving.
        if pause > 5_000 {
            return Err(format!("{what}: no lock granted for {pause} ms"));
        }
    }
    if code.trim() != "0" {
        return Err(format!("the e2e driver failed (exit {})", code.trim()));
    }
    say("pass".into());
    Ok(())
}
