//! `cargo xtask …`: every chore of the repo as a Rust command.
//!
//! - `test`              the whole suite: fmt check, clippy -D warnings, every test
//! - `bench <name>`      a benchmark (release), args passed through
//! - `up`                three replicas of every service on 127.0.0.1
//!
//! Each subcommand shells out to cargo with the workspace's shared target dir.

mod e2e;
mod e2e_cache;
mod e2e_queue;
mod image;
mod manifests;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "test" => test(rest),
        "bench" => bench(rest),
        "up" => up(rest),
        "manifests" => write_manifests(),
        "image" => image::build_all(),
        "e2e" => e2e::run_cli(rest),
        "validate-manifests" => validate_manifests(),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test                 fmt check, clippy -D warnings, the whole test suite\n  \
                 bench <consensus|lock|queue|cache|failover> [..]  a benchmark (release build)\n  \
                 up [DATA_DIR]        three replicas of every service on 127.0.0.1\n  \
                 manifests            write k8s/ (generated Kubernetes manifests)\n  \
                 image                build the images (from scratch) into Docker + OCI archives\n  \
                 e2e [lock|queue|cache] [SECONDS]  each service's three replicas in Docker\n  \
                                      under partitions and kills (every service unless one is named)\n  \
                 validate-manifests   check k8s/ against the Kubernetes schemas (offline)"
            );
            return if cmd == "help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// How long each e2e driver runs (the faults happen inside this window).
const E2E_SECONDS: u64 = 60;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command) -> Result {
    eprintln!("$ {c:?}");
    let status = c.status().map_err(|e| format!("cannot run {c:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{c:?} failed: {status}"))
    }
}

fn test(extra: &[String]) -> Result {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    // cache-svc's tests run a real redis-server (Debian package).
    install_deb("redis-server", "redis-server")?;
    let mut t = cargo();
    t.args(["test", "--workspace"]).args(extra);
    run(t)?;
    python_client_tests()?;
    validate_manifests()?;
    if e2e::available() {
        e2e::run(E2E_SECONDS)
    } else {
        eprintln!("xtask test: no Docker engine, skipping the Docker end-to-end test");
        Ok(())
    }
}

/// `pip install`s Python packages (the registry is PyPI).
fn pip_install(packages: &[&str]) -> Result {
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(packages);
    run(pip)
}

/// The shared cargo target directory.
fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
}

/// Python packages the client in clients/python needs to be tested.
const PYTHON_TEST_PACKAGES: &[&str] = &[
    "grpcio",
    "grpcio-tools",
    "grpcio-status",
    "googleapis-common-protos",
    "protobuf",
    "pytest",
];

/// Installs [`PYTHON_TEST_PACKAGES`] unless they are there.
fn python_test_packages() -> Result {
    let have = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_status, google.rpc, pytest",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        pip_install(PYTHON_TEST_PACKAGES)?;
    }
    Ok(())
}

/// The Python client's tests (pytest) against three real `lock-svc`
/// processes, the debug binary `cargo test --workspace` just built;
/// installs what they need first if it is missing.
fn python_client_tests() -> Result {
    python_test_packages()?;
    let dir = root().join("clients/python");
    let mut pytest = Command::new("python3");
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(&dir)
        .env(
            "DSYNC_LOCK_SVC_BIN",
            target_dir().join("debug").join("lock-svc"),
        );
    run(pytest)
}

fn write_manifests() -> Result {
    let dir = root().join("k8s");
    manifests::write(&dir).map_err(|e| format!("writing {}: {e}", dir.display()))?;
    println!("wrote {}", dir.display());
    Ok(())
}

/// Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Validates every generated resource with the `kubernetes-validate` PyPI
/// package (schemas bundled: no cluster, no network), installing it first
/// if needed.
fn validate_manifests() -> Result {
    let dir = root().join("k8s");
    let stale = manifests::stale(&dir);
    if !stale.is_empty() {
        return Err(format!(
            "k8s/ is out of date ({stale:?}); run `cargo xtask manifests`"
        ));
    }
    let have = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        pip_install(&["kubernetes-validate"])?;
    }
    let mut v = Command::new("kubernetes-validate");
    v.args(["--strict", "-k", KUBERNETES_VERSION]);
    for (path, _) in manifests::generate() {
        if !path.ends_with("kustomization.yaml") {
            v.arg(dir.join(path));
        }
    }
    run(v)
}

/// Benchmarks: name → (crate, example) that runs it.
const BENCHES: &[(&str, &str, &str)] = &[
    ("consensus", "consensus", "consensus_bench"),
    ("lock", "lock-svc", "lock_bench"),
    ("queue", "queue-svc", "queue_bench"),
    ("cache", "cache-svc", "cache_bench"),
];

fn bench(args: &[String]) -> Result {
    let usage = || {
        let mut names: Vec<&str> = BENCHES.iter().map(|(n, _, _)| *n).collect();
        names.push("failover");
        format!("usage: cargo xtask bench <{}> [args…]", names.join("|"))
    };
    let (what, rest) = args.split_first().ok_or_else(usage)?;
    if what == "failover" {
        return failover_bench(rest);
    }
    let (_, krate, example) = BENCHES
        .iter()
        .find(|(n, _, _)| n == what)
        .ok_or_else(usage)?;
    if *what == "queue" {
        // The bench runs replicas as processes, and JetStream beside them.
        build_release("queue-svc")?;
        install_nats_server();
    }
    if *what == "lock" {
        // Three lock-svc processes, and the same rows against etcd when it
        // can be had.
        build_release("lock-svc")?;
        if let Err(e) = install_deb("etcd", "etcd-server") {
            eprintln!("xtask bench: {e}; etcd rows skipped");
        }
    }
    if *what == "cache" {
        // Three nodes as processes, with redis-server behind them and
        // alone beside them.
        build_release("cache-svc")?;
        install_deb("redis-server", "redis-server")?;
    }
    let mut c = cargo();
    c.args(["run", "--release", "-p", krate, "--example", example, "--"])
        .args(rest);
    run(c)
}

/// `bench failover`: the Python client's pause in lock grants after the
/// leader process is killed or hung (clients/python/failover_bench.py),
/// against release `lock-svc` processes.
fn failover_bench(args: &[String]) -> Result {
    build_release("lock-svc")?;
    python_test_packages()?;
    let mut py = Command::new("python3");
    py.arg("failover_bench.py")
        .args(args)
        .current_dir(root().join("clients/python"))
        .env(
            "DSYNC_LOCK_SVC_BIN",
            target_dir().join("release").join("lock-svc"),
        );
    run(py)
}

/// Builds the release binary of the service `name` (package and binary
/// share the name), which a bench then runs as separate processes.
fn build_release(name: &str) -> Result {
    let mut b = cargo();
    b.args(["build", "--release", "-p", name, "--bin", name]);
    run(b)
}

/// Installs Debian's nats-server for the JetStream comparison when it is
/// missing and apt can (root); otherwise the bench runs without it.
fn install_nats_server() {
    if let Err(e) = install_deb("nats-server", "nats-server") {
        eprintln!("xtask bench: {e}; JetStream rows skipped");
    }
}

/// Installs Debian package `package` unless `binary` already runs.
fn install_deb(binary: &str, package: &str) -> Result {
    let present = Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    let mut apt = Command::new("apt-get");
    apt.args(["install", "-y", "-q", package]);
    run(apt).map_err(|e| format!("could not install {package} ({e})"))
}

/// The services `up` starts: (binary, first gRPC port, first metrics port).
/// Three replicas each, on consecutive ports. A new service is one line.
const SERVICES: &[(&str, u16, u16)] = &[
    ("lock-svc", 7001, 9101),
    ("queue-svc", 7011, 9111),
    ("cache-svc", 7021, 9121),
];

fn up(args: &[String]) -> Result {
    let data = root().join(args.first().map(String::as_str).unwrap_or("data"));
    let mut build = cargo();
    build.args(["build", "--release", "-p", "client"]);
    for (bin, _, _) in SERVICES {
        build.args(["-p", bin]);
    }
    run(build)?;
    let target = target_dir();
    let mut children = Vec::new();
    for (bin, base, metrics) in SERVICES {
        let peers: Vec<String> = (1..=3u16)
            .map(|i| format!("{i}=127.0.0.1:{}", base + i - 1))
            .collect();
        for i in 1..=3u16 {
            let child = Command::new(target.join("release").join(bin))
                .env("DSYNC_NODE_ID", i.to_string())
                .env("DSYNC_LISTEN", format!("127.0.0.1:{}", base + i - 1))
                .env(
                    "DSYNC_METRICS_LISTEN",
                    format!("127.0.0.1:{}", metrics + i - 1),
                )
                .env("DSYNC_PEERS", peers.join(","))
                .env("DSYNC_DATA_DIR", data.join(bin).join(format!("n{i}")))
                .spawn()
                .map_err(|e| format!("start {bin} {i}: {e}"))?;
            children.push(child);
        }
        println!(
            "{bin}: three replicas on 127.0.0.1:{base}..={} (metrics on :{metrics}..={}, data in {})",
            base + 2,
            metrics + 2,
            data.join(bin).display()
        );
    }
    println!(
        "\nTry it (the dsync CLI defaults to these endpoints):\n  \
         target/release/dsync lock acquire orders/42 --mode exclusive\n  \
         target/release/dsync lock status orders/42\n  \
         target/release/dsync session list\n  \
         target/release/dsync cluster status\n  \
         target/release/dsync queue create-topic orders --partitions 3\n  \
         target/release/dsync cache set user:7 Ada && target/release/dsync cache get user:7 --verbose\n  \
         target/release/dsync cache status\n\
         Ctrl-C stops the cluster (the replicas get SIGINT and shut down cleanly)."
    );
    let mut failed = false;
    for mut c in children {
        failed |= !c.wait().map(|s| s.success()).unwrap_or(false);
    }
    if failed {
        Err("a replica exited with an error".into())
    } else {
        Ok(())
    }
}
