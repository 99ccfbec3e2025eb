//! The tower middleware in front of every service's gRPC methods.
//!
//! Per request: a tracing span named after the method; a server-side
//! timeout (per method: a lock wait may legitimately take minutes, a status
//! read may not); a concurrency limit that refuses the request at once with
//! `RESOURCE_EXHAUSTED` instead of queueing without bound; and request
//! count / latency metrics by method and status code.
//!
//! Internal traffic — the Raft transport, health checks, reflection — is
//! never shed or timed out: shedding Raft messages under client load would
//! turn overload into elections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::body::Body as BoxBody;
use tonic::Status;
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
fn code_of(resp: &http::Response<BoxBody>) -> &'static str {
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
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
                let status = Status::resource_exhausted(format!(
                    "server is at its limit of {} concurrent requests; retry with backoff",
                    limits.max_concurrent
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let timeout = limits
            .long_methods
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix.as_str()))
            .map_or(limits.default_timeout, |(_, t)| *t);
        let span = tracing::info_span!("rpc", method = %path);
        Box::pin(
            async move {
                let start = Instant::now();
                let resp = match tokio::time::timeout(timeout, inner.call(req)).await {
                    Ok(r) => r?,
                    Err(_) => Status::deadline_exceeded(format!(
                        "the server's limit of {} ms for {path} passed",
                        timeout.as_millis()
                    ))
                    .into_http(),
                };
                let code = code_of(&resp);
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
