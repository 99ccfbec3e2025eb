//! Logging: `RUST_LOG` sets levels (default `info`, raft-rs at `warn`),
//! `DSYNC_LOG_FORMAT=json` switches from human-readable lines to one JSON
//! object per line (for log shippers).

/// Installs the global subscriber; later calls are no-ops.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn"))
        // h2 warns of every ACK of a PING it did not send: the delivery
        // tracker's (see `delivery`).
        .add_directive(
            "h2::proto::ping_pong=error"
                .parse()
                .expect("a valid directive"),
        );
    let json = std::env::var("DSYNC_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}
