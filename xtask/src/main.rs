//! `cargo xtask …`: every chore of the repo as a Rust command.
//!
//! - `test`              the whole suite: fmt check, clippy -D warnings, every test
//! - `bench consensus`   the consensus benchmark (release), args passed through
//! - `up`                a local three-replica cluster on 127.0.0.1
//!
//! Each subcommand shells out to cargo with the workspace's shared target dir.

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
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test                 fmt check, clippy -D warnings, the whole test suite\n  \
                 bench consensus [..] the consensus benchmark (release build)\n  \
                 up [..]              a local three-replica cluster on 127.0.0.1"
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
    let mut t = cargo();
    t.args(["test", "--workspace"]).args(extra);
    run(t)
}

fn bench(args: &[String]) -> Result {
    match args.split_first() {
        Some((what, rest)) if what == "consensus" => {
            let mut c = cargo();
            c.args([
                "run",
                "--release",
                "-p",
                "consensus",
                "--example",
                "bench",
                "--",
            ])
            .args(rest);
            run(c)
        }
        _ => Err("usage: cargo xtask bench consensus [--proposers 1,64,512] [--seconds 10]".into()),
    }
}

fn up(args: &[String]) -> Result {
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "-p",
        "consensus",
        "--bin",
        "raft-demo",
        "--",
        "up",
    ])
    .args(args);
    run(c)
}
