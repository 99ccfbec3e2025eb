//! `cargo xtask e2e [lock|queue|cache] [SECONDS]`: each service's
//! three-replica cluster in Docker, driven by the Rust client under faults
//! — lock-svc (this file), then queue-svc (`e2e_queue.rs`), then cache-svc
//! (`e2e_cache.rs`); one of them if named.
//!
//! The replicas run as containers named like a StatefulSet's pods
//! (`lock-svc-0..2`, `queue-svc-0..2`, `cache-svc-0..2`) on a private
//! `--internal` network, configured exactly as in Kubernetes (pod name,
//! replica count, peer template). The load driver (`dsync-e2e`, see
//! crates/e2e) runs in a fourth container on the same network, checks
//! safety itself and prints the wall-clock time of every success, which
//! this orchestrator reads back to tell how long service paused after each
//! fault it injected.
//!
//! The lock-svc scenario (`dsync-e2e load`):
//! 1. disconnects the leader's container from the network: the majority
//!    must elect a new leader and keep granting locks; the isolated replica
//!    must refuse a write; then reconnects it and waits for it to converge;
//! 2. `docker kill`s a replica and starts it again from its volume.
//!
//! The driver checks mutual exclusion, fencing-token order and that every
//! acknowledged lock survived; this side reports how soon grants resumed
//! after the partition.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::image::tag;
use crate::Result;

pub const REPLICAS: usize = 3;
pub const PORT: u16 = 7001;
/// A replica's own endpoint, from inside its container.
pub const LOCAL: &str = "127.0.0.1:7001";
/// Longest pause tolerated after a fault. A liveness bound, generous on
/// purpose: the figures themselves are recorded in BENCHMARKS.md; this only
/// catches a cluster that stopped serving.
pub const PAUSE_BOUND_MS: u64 = 5_000;

/// One (replica, Raft group) line of `dsync cluster status`.
#[derive(Debug)]
pub struct Row {
    pub node: usize,
    pub role: String,
    pub group: u64,
    pub commit: u64,
    pub applied: u64,
}

/// One service's cluster: its network, containers and driver.
pub struct Env {
    pub net: String,
    pub prefix: String,
    /// The service, its image and its pods' name (`<svc>-<ordinal>`).
    pub svc: &'static str,
    t0: Instant,
}

pub fn docker(args: &[&str]) -> Result<String> {
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

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sleeps until wall-clock `at` (ms), if it is still ahead.
pub fn sleep_until(at: u64) {
    std::thread::sleep(Duration::from_millis(at.saturating_sub(wall_ms())));
}

/// The longest gap between consecutive successes (wall-clock ms, sorted)
/// that ends within 10 s after `at`, counting the time from `at` to the
/// first success after it.
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

/// Prints how many successes (`what`) came per second of the run, with the
/// faults' seconds, and returns the longest pause in the 10 s after each
/// fault (`(name, wall-clock ms)`).
pub fn pauses(env: &Env, what: &str, times: &[u64], faults: &[(&str, u64)]) -> Vec<u64> {
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        let mut per_sec = vec![0u32; ((last - first) / 1000 + 1) as usize];
        for t in times {
            per_sec[((t - first) / 1000) as usize] += 1;
        }
        let marks: Vec<String> = faults
            .iter()
            .map(|(name, at)| format!("{name} at second {}", at.saturating_sub(*first) / 1000))
            .collect();
        env.say(format!(
            "{what} per second ({}): {per_sec:?}",
            marks.join(", ")
        ));
    }
    faults
        .iter()
        .map(|&(_, at)| longest_pause(times, at))
        .collect()
}

/// True if a Docker engine answers.
pub fn available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the driver printed, and how it exited.
pub struct Driver {
    pub code: String,
    pub out: String,
}

impl Driver {
    /// The wall-clock times the driver printed as `<key>=t1,t2,…`.
    pub fn times(&self, key: &str) -> Vec<u64> {
        let prefix = format!("{key}=");
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or("")
            .split(',')
            .filter_map(|t| t.parse().ok())
            .collect()
    }
}

/// Lines worth showing a person: all but the timestamp lists.
fn readable(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.contains("_times_ms=")).collect()
}

impl Env {
    fn new(prefix: &str, svc: &'static str) -> Self {
        Self {
            net: format!("{prefix}-{svc}-net"),
            prefix: prefix.to_owned(),
            svc,
            t0: Instant::now(),
        }
    }
    pub fn say(&self, msg: String) {
        println!(
            "e2e {} [{:>5.1}s] {msg}",
            self.svc,
            self.t0.elapsed().as_secs_f64()
        );
    }
    pub fn pod(&self, i: usize) -> String {
        format!("{}-{i}", self.svc)
    }
    pub fn container(&self, i: usize) -> String {
        format!("{}-{}-{i}", self.prefix, self.svc)
    }
    fn driver(&self) -> String {
        format!("{}-{}-driver", self.prefix, self.svc)
    }
    pub fn endpoints(&self) -> String {
        (0..REPLICAS)
            .map(|i| format!("{}:{PORT}", self.pod(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_replica(&self, i: usize) -> Result {
        let name = self.container(i);
        let pod = self.pod(i);
        let vol = format!("{name}-data:/var/lib/dsync");
        let template = format!("DSYNC_PEER_TEMPLATE={}-{{ordinal}}:{PORT}", self.svc);
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
            &tag(self.svc),
        ])?;
        Ok(())
    }

    /// The private network, the replicas, and the first leader elected.
    fn up(&self) -> Result<usize> {
        // A private network: containers reach each other, nothing else.
        docker(&["network", "create", "--internal", &self.net])?;
        for i in 0..REPLICAS {
            self.start_replica(i)?;
        }
        let leader = self.leader(&[0, 1, 2], Duration::from_secs(30))?;
        self.say(format!("cluster up, leader {}", self.pod(leader)));
        Ok(leader)
    }

    /// Runs the `dsync` CLI inside replica `via` against `endpoints`.
    pub fn dsync_to(&self, via: usize, endpoints: &str, args: &[&str]) -> Result<String> {
        let container = self.container(via);
        let mut all = vec![
            "exec",
            &container,
            "/usr/local/bin/dsync",
            "--endpoints",
            endpoints,
        ];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// `dsync cluster status` from inside replica `via`: a row per Raft
    /// group of each replica it reached.
    pub fn status(&self, via: usize) -> Vec<Row> {
        self.status_of(via, &self.endpoints())
    }

    /// Like `status`, asking only `endpoints`.
    fn status_of(&self, via: usize, endpoints: &str) -> Vec<Row> {
        let out = self
            .dsync_to(via, endpoints, &["cluster", "status"])
            .unwrap_or_default();
        out.lines()
            .skip(1)
            .filter_map(|l| {
                // replica node role group term leader commit applied last …
                let cols: Vec<&str> = l.split_whitespace().collect();
                Some(Row {
                    node: cols.get(1)?.parse().ok()?,
                    role: cols.get(2)?.to_string(),
                    group: cols.get(3)?.parse().ok()?,
                    commit: cols.get(6)?.parse().ok()?,
                    applied: cols.get(7)?.parse().ok()?,
                })
            })
            .collect()
    }

    /// A replica (index) leading some group, as seen from `via`.
    pub fn leader(&self, via: &[usize], within: Duration) -> Result<usize> {
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

    /// Per Raft group, the highest commit index that the replicas `nodes`
    /// report (asked from inside the first of them).
    pub fn commits(&self, nodes: &[usize]) -> Result<BTreeMap<u64, u64>> {
        let endpoints: Vec<String> = nodes
            .iter()
            .map(|&i| format!("{}:{PORT}", self.pod(i)))
            .collect();
        let mut out = BTreeMap::new();
        for r in self.status_of(nodes[0], &endpoints.join(",")) {
            if nodes.contains(&(r.node - 1)) {
                let c = out.entry(r.group).or_insert(0);
                *c = r.commit.max(*c);
            }
        }
        if out.is_empty() {
            return Err(format!("could not read the commit indexes of {nodes:?}"));
        }
        Ok(out)
    }

    /// Waits until replica `i` is in one of `roles` in every group of
    /// `commits` and has applied up to its commit index there.
    pub fn wait_caught_up(
        &self,
        i: usize,
        commits: &BTreeMap<u64, u64>,
        roles: &[&str],
        within: Duration,
    ) -> Result {
        let deadline = Instant::now() + within;
        loop {
            let st = self.status(i);
            let mine: Vec<&Row> = st.iter().filter(|r| r.node == i + 1).collect();
            let done = commits.iter().all(|(g, c)| {
                mine.iter()
                    .any(|r| r.group == *g && roles.contains(&r.role.as_str()) && r.applied >= *c)
            });
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not catch up to {commits:?}: {mine:?}",
                    self.pod(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn disconnect(&self, i: usize) -> Result {
        docker(&["network", "disconnect", &self.net, &self.container(i)])?;
        Ok(())
    }

    pub fn reconnect(&self, i: usize) -> Result {
        let pod = self.pod(i);
        docker(&[
            "network",
            "connect",
            "--alias",
            &pod,
            &self.net,
            &self.container(i),
        ])?;
        Ok(())
    }

    /// Runs `dsync <args>` inside replica `i` against itself alone, which
    /// must fail (it is cut off); returns the error it printed.
    pub fn refuses(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .args(["exec", &self.container(i), "/usr/local/bin/dsync"])
            .args([
                "--retry-ms",
                "2000",
                "--endpoints",
                &format!("127.0.0.1:{PORT}"),
            ])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Err(format!(
                "the isolated replica accepted a write ({args:?}): {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }

    /// Reconnects replica `i`, cut off from the others, and waits until it
    /// is in one of `roles` in every Raft group and applied everything the
    /// others committed meanwhile.
    pub fn heal(&self, i: usize, roles: &[&str]) -> Result {
        let others: Vec<usize> = (0..REPLICAS).filter(|&o| o != i).collect();
        let committed_while_cut = self.commits(&others)?;
        self.reconnect(i)?;
        self.say(format!("reconnected {}", self.pod(i)));
        self.wait_caught_up(i, &committed_while_cut, roles, Duration::from_secs(20))?;
        self.say(format!(
            "{} rejoined ({}) and applied up to the commit indexes reached while it was cut off: {committed_while_cut:?}",
            self.pod(i),
            roles.join(" or ")
        ));
        Ok(())
    }

    /// `docker kill`s replica `i`, starts it again from its volume 2 s
    /// later and waits until it caught up as in `heal`. Returns when it
    /// was killed (wall-clock ms), which must leave the driver (ending at
    /// `driver_end`) 10 s to observe.
    pub fn kill_restart(&self, i: usize, roles: &[&str], driver_end: u64) -> Result<u64> {
        let kill_at = wall_ms();
        if kill_at + 10_000 > driver_end {
            return Err("the driver ends too soon to observe the kill; run it longer".into());
        }
        docker(&["kill", &self.container(i)])?;
        self.say(format!("docker kill {}", self.pod(i)));
        std::thread::sleep(Duration::from_secs(2));
        let others: Vec<usize> = (0..REPLICAS).filter(|&o| o != i).collect();
        let committed_while_down = self.commits(&others)?;
        docker(&["start", &self.container(i)])?;
        self.say(format!("restarted {}", self.pod(i)));
        self.wait_caught_up(i, &committed_while_down, roles, Duration::from_secs(30))?;
        self.say(format!(
            "{} recovered from its volume and caught up with the {} groups",
            self.pod(i),
            committed_while_down.len()
        ));
        Ok(kill_at)
    }

    /// Starts the driver (`dsync-e2e <args>`) on the network.
    pub fn start_driver(&self, args: &[&str]) -> Result {
        let driver = self.driver();
        let mut all = vec!["run", "-d", "--name", &driver, "--network", &self.net];
        let image = tag("e2e");
        all.push(&image);
        all.extend_from_slice(args);
        docker(&all)?;
        Ok(())
    }

    /// Waits for the driver to finish and prints its report.
    pub fn finish_driver(&self) -> Result<Driver> {
        let code = docker(&["wait", &self.driver()])?.trim().to_owned();
        let out = docker(&["logs", &self.driver()])?;
        println!(
            "e2e {} driver:\n  {}",
            self.svc,
            readable(&out).join("\n  ")
        );
        Ok(Driver { code, out })
    }

    /// The driver's output (both streams, timestamp lists left out) and the
    /// replicas' last log lines.
    fn print_logs(&self) {
        if let Ok(o) = Command::new("docker")
            .args(["logs", &self.driver()])
            .output()
        {
            eprintln!("--- {} ---", self.driver());
            for s in [&o.stdout, &o.stderr] {
                for l in readable(&String::from_utf8_lossy(s)) {
                    eprintln!("{l}");
                }
            }
        }
        for i in 0..REPLICAS {
            eprintln!("--- {} ---", self.container(i));
            let _ = Command::new("docker")
                .args(["logs", "--tail", "60", &self.container(i)])
                .status();
        }
    }

    fn cleanup(&self) {
        let _ = docker(&["rm", "-f", &self.driver()]);
        for i in 0..REPLICAS {
            let _ = docker(&["rm", "-f", &self.container(i)]);
            let _ = docker(&["volume", "rm", "-f", &format!("{}-data", self.container(i))]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

type Scenario = fn(&Env, u64) -> Result;

/// The scenarios, in the order `run` runs them: (service, scenario).
const SCENARIOS: &[(&str, Scenario)] = &[
    ("lock-svc", lock_scenario),
    ("queue-svc", crate::e2e_queue::scenario),
    ("cache-svc", crate::e2e_cache::scenario),
];

/// Every scenario, each driven for `seconds`.
pub fn run(seconds: u64) -> Result {
    run_some(&[], seconds)
}

/// `cargo xtask e2e [lock|queue|cache] [SECONDS]`.
pub fn run_cli(args: &[String]) -> Result {
    let mut only = Vec::new();
    let mut seconds = crate::E2E_SECONDS;
    for a in args {
        if let Ok(s) = a.parse() {
            seconds = s;
        } else if let Some((svc, _)) = SCENARIOS
            .iter()
            .find(|(svc, _)| *svc == a || svc.strip_suffix("-svc") == Some(a))
        {
            only.push(*svc);
        } else {
            return Err(format!(
                "usage: cargo xtask e2e [lock|queue|cache] [SECONDS]; not understood: {a}"
            ));
        }
    }
    run_some(&only, seconds)
}

fn run_some(only: &[&str], seconds: u64) -> Result {
    if !available() {
        return Err("no Docker engine answers `docker info`".into());
    }
    crate::image::build_all()?;
    let prefix = format!("dsync-e2e-{}", std::process::id());
    for &(svc, scenario) in SCENARIOS {
        if !only.is_empty() && !only.contains(&svc) {
            continue;
        }
        let env = Env::new(&prefix, svc);
        env.cleanup();
        let res = env.up().and_then(|_| scenario(&env, seconds));
        if res.is_err() || std::env::var_os("DSYNC_E2E_LOGS").is_some() {
            env.print_logs();
        }
        env.cleanup();
        res.map_err(|e| format!("{svc}: {e}"))?;
        env.say(format!("pass ({:.0} s)", env.t0.elapsed().as_secs_f64()));
    }
    Ok(())
}

fn lock_scenario(env: &Env, seconds: u64) -> Result {
    let secs = seconds.to_string();
    env.start_driver(&["load", "--endpoints", &env.endpoints(), "--seconds", &secs])?;
    let driver_end = wall_ms() + seconds * 1000;
    std::thread::sleep(Duration::from_secs(seconds / 6));

    // 1. Partition the leader away.
    let old = env.leader(&[0, 1, 2], Duration::from_secs(10))?;
    let cut_at = wall_ms();
    env.disconnect(old)?;
    env.say(format!(
        "disconnected leader {} from the network",
        env.pod(old)
    ));
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let new = env.leader(&others, Duration::from_secs(10))?;
    env.say(format!("{} leads the majority", env.pod(new)));
    let refused = env.refuses(old, &["session", "open"])?;
    env.say(format!("isolated replica refused a write: {refused}"));
    std::thread::sleep(Duration::from_secs(2));
    // Converges: it follows the new leader and applies everything the
    // majority had committed while it was cut off.
    env.heal(old, &["follower"])?;

    // 2. Kill a replica outright and restart it from its volume.
    let victim = env.leader(&[0, 1, 2], Duration::from_secs(10))?;
    let kill_at = env.kill_restart(victim, &["follower", "leader"], driver_end)?;

    // The driver finishes and reports.
    let driver = env.finish_driver()?;
    let faults = [("leader partitioned", cut_at), ("replica killed", kill_at)];
    let times = driver.times("grant_times_ms");
    for ((what, _), pause) in faults.iter().zip(pauses(env, "grants", &times, &faults)) {
        env.say(format!(
            "{what}: longest pause between lock grants in the 10 s after: {pause} ms"
        ));
        if pause > PAUSE_BOUND_MS {
            return Err(format!("{what}: no lock granted for {pause} ms"));
        }
    }
    if driver.code != "0" {
        return Err(format!("the e2e driver failed (exit {})", driver.code));
    }
    Ok(())
}
