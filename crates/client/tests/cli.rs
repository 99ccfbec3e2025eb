//! The `dsync` CLI without a cluster: usage errors and unreachable
//! replicas are reported clearly with a failing exit code. (Against a live
//! cluster it is exercised by lock-svc's `tests/binary.rs`; cargo builds
//! this package's binary for this test, which that one relies on too.)

use std::process::Command;

fn dsync(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsync"))
        .args(args)
        .output()
        .expect("run dsync");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn usage_errors_are_explained() {
    let (code, out) = dsync(&["lock", "acquire"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("<RESOURCE>"), "{out}");
    let (code, out) = dsync(&["lock", "acquire", "r", "--mode", "sideways"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("exclusive"), "{out}");
}

#[test]
fn unreachable_replicas_fail_with_a_message() {
    // A port nothing listens on: bind, take the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = format!("127.0.0.1:{port}");
    let (code, out) = dsync(&["--endpoints", &ep, "cluster", "status"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("unreachable") && out.contains("no replica answered"),
        "{out}"
    );
    let (code, out) = dsync(&[
        "--endpoints",
        &ep,
        "--retry-ms",
        "300",
        "lock",
        "status",
        "x",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Unavailable"), "{out}");
}
