//! The tower middleware in front of every service's gRPC methods.
//!
//! Per request: a tracing span named after the method; a server-side
//! timeout (per method: a lock wait may legitimately take minutes, a status
//! read may not); a concurrency limit that refuses the request at once with
//! `RESOURCE_EXHAUSTED` instead of queueing without bound; and request
//! count / latency metrics by method and status code.
//!
//! Every status it makes carries a `google.rpc.ErrorInfo` (`OVERLOADED`,
//! `SERVER_TIMEOUT`), and it gives tonic's own codec errors their
//! documented code and reason: an oversized request (tonic: `OUT_OF_RANGE`)
//! becomes `RESOURCE_EXHAUSTED` / `REQUEST_TOO_LARGE`, an undecodable one
//! (tonic: `INTERNAL`) `INVALID_ARGUMENT` / `MALFORMED_REQUEST`. A response
//! carrying a [`Delivery`](crate::Delivery) gets a body that disarms it
//! once sent whole.
//!
//! Internal traffic — the Raft transport, health checks, reflection — is
//! never shed or timed out: shedding Raft messages under client load would
//! turn overload into elections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proto::status::error;
use tokio::sync::Semaphore;
use tonic::body::Body as BoxBody;
use tonic::Code;

use crate::delivery::{Delivering, Pending, TrackedInfo};

/// The largest request message a service accepts (services set it as
/// their servers' `max_decoding_message_size`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
use tower::{Layer, Service};
use tracing::Instrument;

/// Limits applied by [`GrpcLayer`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_concurrent: usize,
    pub default_timeout: Duration,
    /// (method path suffix, timeout) for methods that wait by design.
    pub long_methods: Vec<(String, Duration)>,
}

#[derive(Clone)]
pub struct GrpcLayer {
    limits: Arc<Limits>,
    permits: Arc<Semaphore>,
}

impl GrpcLayer {
    pub fn new(limits: Limits) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent));
        Self {
            limits: Arc::new(limits),
            permits,
        }
    }
}

impl<S> Layer<S> for GrpcLayer {
    type Service = GrpcMiddleware<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMiddleware {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMiddleware<S> {
    inner: S,
    layer: GrpcLayer,
}

fn is_internal(path: &str) -> bool {
    path.starts_with("/dsync.raft.") || path.starts_with("/grpc.")
}

/// The gRPC status code of a response: tonic sends errors as
/// trailers-only responses, with `grpc-status` in the headers.
fn status_of(resp: &http::Response<BoxBody>) -> Code {
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    Code::from_i32(code)
}

/// Replaces tonic's codec errors (which carry no details and, for these
/// two, codes that say the wrong thing) with documented ones.
fn rewrite_codec_error(resp: http::Response<BoxBody>) -> http::Response<BoxBody> {
    let code = status_of(&resp);
    if !matches!(code, Code::OutOfRange | Code::Internal)
        || resp.headers().contains_key("grpc-status-details-bin")
    {
        return resp;
    }
    let message = tonic::Status::from_header_map(resp.headers())
        .map(|s| s.message().to_owned())
        .unwrap_or_default();
    if code == Code::OutOfRange && message.contains("decoded message length too large") {
        // The service's own limit, as tonic states it ("… the limit is: N
        // bytes"); services set their own (lock-svc MAX_REQUEST_BYTES,
        // queue-svc 16 MiB).
        let limit = message
            .split("the limit is: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(MAX_REQUEST_BYTES);
        error(
            Code::ResourceExhausted,
            format!("the request is larger than this service's limit of {limit} bytes ({message})"),
            "REQUEST_TOO_LARGE",
            [("limit_bytes", limit.to_string())],
        )
        .into_http()
    } else if code == Code::Internal && message.contains("failed to decode Protobuf message") {
        error(
            Code::InvalidArgument,
            format!("the request is not a valid protobuf message of the method's type ({message})"),
            "MALFORMED_REQUEST",
            std::iter::empty::<(String, String)>(),
        )
        .into_http()
    } else {
        resp
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<BoxBody>> for GrpcMiddleware<S>
where
    S: Service<http::Request<BoxBody>, Response = http::Response<BoxBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        // The standard clone dance: use the service that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_owned();
        if is_internal(&path) {
            return Box::pin(inner.call(req));
        }
        let limits = self.layer.limits.clone();
        let permit = match self.layer.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("dsync_grpc_shed_total", "method" => path.clone()).increment(1);
                let status = error(
                    Code::ResourceExhausted,
                    format!(
                        "server is at its limit of {} concurrent requests; retry with backoff",
                        limits.max_concurrent
                    ),
                    "OVERLOADED",
                    [("limit", limits.max_concurrent.to_string())],
                );
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let method_limit = limits
            .long_methods
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix.as_str()))
            .map_or(limits.default_timeout, |(_, t)| *t);
        // The client's deadline (grpc-timeout), a millisecond early so this
        // answer, with its reason, wins over tonic's bare CANCELLED.
        let client_deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| d.saturating_sub(Duration::from_millis(1)));
        let (timeout, by_client) = match client_deadline {
            Some(d) if d < method_limit => (d, true),
            _ => (method_limit, false),
        };
        let tracker = req
            .extensions()
            .get::<TrackedInfo>()
            .map(|i| i.tracker.clone());
        let span = tracing::info_span!("rpc", method = %path);
        Box::pin(
            async move {
                let start = Instant::now();
                let mut resp = match tokio::time::timeout(timeout, inner.call(req)).await {
                    Ok(r) => rewrite_codec_error(r?),
                    Err(_) if by_client => error(
                        Code::DeadlineExceeded,
                        format!(
                            "the call's deadline ({} ms) passed; a write may or may not have been applied",
                            timeout.as_millis()
                        ),
                        "CLIENT_DEADLINE",
                        [("limit_ms", timeout.as_millis().to_string())],
                    )
                    .into_http(),
                    Err(_) => error(
                        Code::DeadlineExceeded,
                        format!(
                            "the server's limit of {} ms for {path} passed; a write may or may not have been applied",
                            timeout.as_millis()
                        ),
                        "SERVER_TIMEOUT",
                        [("limit_ms", timeout.as_millis().to_string())],
                    )
                    .into_http(),
                };
                if let Some(d) = resp.extensions_mut().remove::<Pending>().and_then(|p| p.take()) {
                    resp = resp.map(|body| BoxBody::new(Delivering::new(body, d, tracker)));
                }
                let code = code_name(status_of(&resp));
                let secs = start.elapsed().as_secs_f64();
                metrics::counter!("dsync_grpc_requests_total", "method" => path.clone(), "code" => code)
                    .increment(1);
                metrics::histogram!("dsync_grpc_request_duration_seconds", "method" => path.clone(), "code" => code)
                    .record(secs);
                tracing::debug!(code, ms = secs * 1000.0, "served");
                drop(permit);
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parsing() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout("1500u"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
