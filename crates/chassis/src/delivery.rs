//! Knowing whether an answer left the server.
//!
//! A handler whose success has a side effect the client must learn about —
//! a lock granted to it — cannot tell from inside the handler whether its
//! answer reaches the client: the client may cancel, its deadline may pass
//! or its connection may drop after the handler returned. A [`Delivery`]
//! answers for such a call. It is armed when created; dropping it armed
//! runs its cleanup (`on_lost`). The handler disarms it when it fails in a
//! way that needs no cleanup, or [`attach`]es it to its response; the
//! [`GrpcLayer`](crate::GrpcLayer) then moves it into the response body and
//! disarms it only when hyper has taken the whole body (the message and the
//! trailers) for the connection. A response dropped before that — the
//! stream was reset, the connection closed, the server's timeout fired —
//! drops the `Delivery` armed, and the cleanup runs.
//!
//! What remains is the time between hyper taking the frames and the
//! client's gRPC library handing them to its caller; a client that gives
//! up inside that window was sent the answer, and learns it again by
//! retrying the same request id.
//!
//! If no layer takes an attached `Delivery` (a service mounted without the
//! chassis), it counts as delivered: without the layer there is no way to
//! know otherwise, and cleaning up a grant the client holds would be worse
//! than keeping one it lost.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

/// Cleanup owed unless the call's answer reaches the transport.
pub struct Delivery {
    on_lost: Option<Box<dyn FnOnce() + Send>>,
}

impl Delivery {
    /// An armed delivery that runs `on_lost` if dropped armed.
    pub fn new(on_lost: impl FnOnce() + Send + 'static) -> Self {
        Self {
            on_lost: Some(Box::new(on_lost)),
        }
    }

    /// Nothing to clean up any more (delivered, or failed harmlessly).
    pub fn disarm(mut self) {
        self.on_lost = None;
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(f) = self.on_lost.take() {
            f();
        }
    }
}

/// The response extension that carries a [`Delivery`] to the layer.
#[derive(Clone)]
pub(crate) struct Pending(Arc<Slot>);

pub(crate) struct Slot(Mutex<Option<Delivery>>);

impl Drop for Slot {
    fn drop(&mut self) {
        // Never taken by a layer: count it as delivered (see the module doc).
        if let Some(d) = self.0.lock().take() {
            d.disarm();
        }
    }
}

impl Pending {
    pub(crate) fn take(&self) -> Option<Delivery> {
        self.0 .0.lock().take()
    }
}

/// Hands `delivery` to the layer, which disarms it once `response` has
/// been taken whole by the transport.
pub fn attach<T>(response: &mut tonic::Response<T>, delivery: Delivery) {
    response
        .extensions_mut()
        .insert(Pending(Arc::new(Slot(Mutex::new(Some(delivery))))));
}

pin_project_lite::pin_project! {
    /// A response body that disarms its [`Delivery`] at its end.
    pub(crate) struct Delivering<B> {
        #[pin]
        inner: B,
        delivery: Option<Delivery>,
    }
}

impl<B> Delivering<B> {
    pub(crate) fn new(inner: B, delivery: Delivery) -> Self {
        Self {
            inner,
            delivery: Some(delivery),
        }
    }
}

impl<B: Body> Body for Delivering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let done = match &polled {
            // gRPC ends a response with trailers (grpc-status); a body that
            // ends without them has still been taken whole.
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(None) => true,
            _ => false,
        };
        if done {
            if let Some(d) = this.delivery.take() {
                d.disarm();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
