//! Knowing whether an answer reached its client.
//!
//! A handler whose success has a side effect the client must learn about —
//! a lock granted to it — cannot tell from inside the handler whether its
//! answer gets out: the client may cancel, its deadline may pass or its
//! connection may drop after the handler returned, and HTTP/2 discards the
//! frames of a reset stream that are still queued. A [`Delivery`] answers
//! for such a call. It is armed when created; dropping it armed runs its
//! cleanup (`on_lost`). The handler disarms it when it fails in a way that
//! needs no cleanup, or [`attach`]es it to its response.
//!
//! The [`GrpcLayer`](crate::GrpcLayer) moves an attached delivery into the
//! response body, and the replica's connections ([`Tracked`]) watch the
//! HTTP/2 frames they write and read. The delivery is disarmed only once
//! the frames that carry the message *and* the trailers that end the
//! stream have been written to the socket:
//! 1. the body yields the message and registers it with the connection's
//!    [`ConnTracker`]; it holds back the trailers until the connection has
//!    written a DATA frame with exactly those bytes (which names the
//!    stream);
//! 2. the connection disarms the delivery when it writes that stream's
//!    end (HEADERS with END_STREAM);
//! 3. anything else loses it: the body dropped before step 1 (hyper saw
//!    RST_STREAM, or the connection closed), an RST_STREAM for the stream
//!    read or written, the connection closing before step 2.
//!
//! What remains is the time between the socket write and the client's gRPC
//! library handing the response to its caller: a client that gives up in
//! that window was sent the answer, and learns it again by retrying the
//! same request id.
//!
//! Without a tracked connection (a service mounted outside the chassis'
//! server) the delivery is disarmed when the body ends; if no layer takes
//! an attached delivery at all, it counts as delivered: cleaning up a grant
//! the client holds would be worse than keeping one it lost.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
    /// A response body that hands its [`Delivery`] on as it is sent.
    pub(crate) struct Delivering<B> {
        #[pin]
        inner: B,
        delivery: Option<Delivery>,
        tracker: Option<Arc<ConnTracker>>,
        // The registration of the message frame, once yielded.
        registered: Option<u64>,
        // Trailers held back until the message is on the wire.
        held: Option<http::HeaderMap>,
    }

    impl<B> PinnedDrop for Delivering<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(t), Some(id)) = (this.tracker.as_ref(), this.registered.take()) {
                // Not written yet: nobody will; the delivery is lost.
                drop(t.withdraw(id));
            }
        }
    }
}

impl<B> Delivering<B> {
    pub(crate) fn new(inner: B, delivery: Delivery, tracker: Option<Arc<ConnTracker>>) -> Self {
        Self {
            inner,
            delivery: Some(delivery),
            tracker,
            registered: None,
            held: None,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Delivering<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let (Some(t), Some(id)) = (this.tracker.as_ref(), *this.registered) {
            // Step 1: the trailers wait for the message to be written.
            if !t.written(id, cx.waker()) {
                return Poll::Pending;
            }
            *this.registered = None;
            if let Some(trailers) = this.held.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let polled = this.inner.poll_frame(cx);
        match (&polled, this.tracker.as_ref()) {
            (Poll::Ready(Some(Ok(frame))), Some(t))
                if frame.is_data() && this.delivery.is_some() =>
            {
                let data = frame.data_ref().expect("a data frame").clone();
                let d = this.delivery.take().expect("checked");
                *this.registered = Some(t.register(data, d));
            }
            (Poll::Ready(Some(Ok(frame))), Some(t))
                if frame.is_trailers() && this.registered.is_some() =>
            {
                let id = this.registered.expect("checked");
                if !t.written(id, cx.waker()) {
                    // Hold the trailers back (step 1); the tracker wakes us.
                    if let Poll::Ready(Some(Ok(frame))) = polled {
                        *this.held = frame.into_trailers().ok();
                    }
                    return Poll::Pending;
                }
                *this.registered = None;
            }
            (Poll::Ready(Some(Ok(frame))), None) if frame.is_trailers() => {
                if let Some(d) = this.delivery.take() {
                    d.disarm();
                }
            }
            (Poll::Ready(None), None) => {
                if let Some(d) = this.delivery.take() {
                    d.disarm();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.registered.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Largest message frame matched byte for byte; larger answers are
/// disarmed when the body ends (they carry no grants here).
const MAX_TRACKED_MESSAGE: usize = 4096;

/// What one connection knows about the tracked answers it carries.
#[derive(Default)]
pub struct ConnTracker {
    state: Mutex<TrackState>,
}

#[derive(Default)]
struct TrackState {
    next_id: u64,
    /// Messages yielded by their bodies, not yet seen written.
    pending: Vec<PendingMessage>,
    /// Streams whose message was written, waiting for their end.
    ends: HashMap<u32, Delivery>,
}

struct PendingMessage {
    id: u64,
    data: Bytes,
    delivery: Option<Delivery>,
    written: bool,
    waker: Option<Waker>,
}

impl ConnTracker {
    fn register(&self, data: Bytes, delivery: Delivery) -> u64 {
        let mut s = self.state.lock();
        s.next_id += 1;
        let id = s.next_id;
        if data.len() > MAX_TRACKED_MESSAGE {
            // Too large to match: count it as written (see the const).
            delivery.disarm();
            s.pending.push(PendingMessage {
                id,
                data: Bytes::new(),
                delivery: None,
                written: true,
                waker: None,
            });
            return id;
        }
        s.pending.push(PendingMessage {
            id,
            data,
            delivery: Some(delivery),
            written: false,
            waker: None,
        });
        id
    }

    /// Whether message `id` was written; if so it is forgotten here.
    fn written(&self, id: u64, waker: &Waker) -> bool {
        let mut s = self.state.lock();
        let Some(pos) = s.pending.iter().position(|p| p.id == id) else {
            return true;
        };
        if s.pending[pos].written {
            s.pending.swap_remove(pos);
            return true;
        }
        s.pending[pos].waker = Some(waker.clone());
        false
    }

    /// The body of message `id` went away: its delivery, if still here.
    fn withdraw(&self, id: u64) -> Option<Delivery> {
        let mut s = self.state.lock();
        let pos = s.pending.iter().position(|p| p.id == id)?;
        s.pending.swap_remove(pos).delivery
    }

    fn wants_data(&self) -> bool {
        self.state.lock().pending.iter().any(|p| !p.written)
    }

    /// A whole frame went out on the socket.
    fn wrote(&self, kind: u8, flags: u8, stream: u32, payload: Option<&[u8]>) {
        let mut s = self.state.lock();
        match kind {
            FRAME_DATA => {
                if let Some(p) = payload.and_then(|b| {
                    s.pending
                        .iter_mut()
                        .find(|p| !p.written && p.data.as_ref() == b)
                }) {
                    p.written = true;
                    let delivery = p.delivery.take();
                    if let Some(w) = p.waker.take() {
                        w.wake();
                    }
                    if let Some(d) = delivery {
                        s.ends.insert(stream, d);
                    }
                }
                if flags & FLAG_END_STREAM != 0 {
                    if let Some(d) = s.ends.remove(&stream) {
                        d.disarm();
                    }
                }
            }
            FRAME_HEADERS if flags & FLAG_END_STREAM != 0 => {
                if let Some(d) = s.ends.remove(&stream) {
                    d.disarm();
                }
            }
            FRAME_RST_STREAM => {
                let lost = s.ends.remove(&stream);
                drop(s);
                drop(lost);
            }
            _ => {}
        }
    }

    /// A whole frame came in from the client.
    fn read(&self, kind: u8, stream: u32) {
        if kind == FRAME_RST_STREAM {
            let lost = self.state.lock().ends.remove(&stream);
            drop(lost);
        }
    }

    /// The connection is gone: whatever was not written never will be.
    fn close(&self) {
        let lost: Vec<Delivery> = self.state.lock().ends.drain().map(|(_, d)| d).collect();
        drop(lost);
    }
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FLAG_END_STREAM: u8 = 0x1;
const CLIENT_PREFACE: usize = 24;

/// Splits one direction of an HTTP/2 connection into frames as its bytes
/// go by (they arrive in arbitrary pieces).
struct FrameParser {
    skip_preface: usize,
    head: [u8; 9],
    head_len: usize,
    remaining: usize,
    capture: Option<Vec<u8>>,
}

impl FrameParser {
    fn new(skip_preface: usize) -> Self {
        Self {
            skip_preface,
            head: [0; 9],
            head_len: 0,
            remaining: 0,
            capture: None,
        }
    }

    /// Feeds bytes; `capture(kind, len)` says whether to keep a frame's
    /// payload; `frame(kind, flags, stream, payload)` sees each whole frame.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        capture: impl Fn(u8, usize) -> bool,
        mut frame: impl FnMut(u8, u8, u32, Option<&[u8]>),
    ) {
        while !bytes.is_empty() {
            if self.skip_preface > 0 {
                let n = self.skip_preface.min(bytes.len());
                self.skip_preface -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.head_len < 9 {
                let n = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len < 9 {
                    return;
                }
                let h = self.head;
                self.remaining = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.capture =
                    capture(h[3], self.remaining).then(|| Vec::with_capacity(self.remaining));
            }
            let n = self.remaining.min(bytes.len());
            if let Some(c) = &mut self.capture {
                c.extend_from_slice(&bytes[..n]);
            }
            self.remaining -= n;
            bytes = &bytes[n..];
            if self.remaining == 0 {
                let h = self.head;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                frame(h[3], h[4], stream, self.capture.take().as_deref());
                self.head_len = 0;
            }
        }
    }
}

/// A server connection that reports the HTTP/2 frames it writes and reads
/// to its [`ConnTracker`] (handed to requests as [`TrackedInfo`]).
pub struct Tracked {
    inner: TcpStream,
    tracker: Arc<ConnTracker>,
    remote: Option<std::net::SocketAddr>,
    out: FrameParser,
    incoming: FrameParser,
}

/// The connect info of a [`Tracked`] connection, in request extensions.
#[derive(Clone)]
pub struct TrackedInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    pub(crate) tracker: Arc<ConnTracker>,
}

impl Tracked {
    pub fn new(inner: TcpStream) -> Self {
        let remote = inner.peer_addr().ok();
        Self {
            inner,
            tracker: Arc::new(ConnTracker::default()),
            remote,
            out: FrameParser::new(0),
            incoming: FrameParser::new(CLIENT_PREFACE),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.close();
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = TrackedInfo;
    fn connect_info(&self) -> TrackedInfo {
        TrackedInfo {
            remote_addr: self.remote,
            tracker: self.tracker.clone(),
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let tracker = &this.tracker;
            this.incoming.feed(
                &buf.filled()[before..],
                |_, _| false,
                |kind, _, stream, _| tracker.read(kind, stream),
            );
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let this = &mut *self;
            let tracker = &this.tracker;
            this.out.feed(
                &buf[..*n],
                |kind, len| {
                    kind == FRAME_DATA && len <= MAX_TRACKED_MESSAGE && tracker.wants_data()
                },
                |kind, flags, stream, payload| tracker.wrote(kind, flags, stream, payload),
            );
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_be_bytes()[1..].to_vec();
        v.extend([kind, flags]);
        v.extend(stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn counted() -> (Delivery, Arc<AtomicUsize>) {
        let lost = Arc::new(AtomicUsize::new(0));
        let l = lost.clone();
        (
            Delivery::new(move || {
                l.fetch_add(1, Ordering::SeqCst);
            }),
            lost,
        )
    }

    /// Feeds `bytes` to a write-side parser in pieces of `step` bytes.
    fn write(t: &ConnTracker, p: &mut FrameParser, bytes: &[u8], step: usize) {
        for chunk in bytes.chunks(step) {
            p.feed(
                chunk,
                |kind, len| kind == FRAME_DATA && len <= MAX_TRACKED_MESSAGE && t.wants_data(),
                |k, f, s, b| t.wrote(k, f, s, b),
            );
        }
    }

    #[test]
    fn a_delivery_is_disarmed_only_when_message_and_end_are_written() {
        let waker = futures::task::noop_waker();
        for step in [1, 2, 7, 1000] {
            let t = ConnTracker::default();
            let mut p = FrameParser::new(0);
            let (d, lost) = counted();
            let id = t.register(Bytes::from_static(b"grant-42"), d);
            assert!(!t.written(id, &waker));
            let mut bytes = frame(4, 0, 0, &[0; 6]); // SETTINGS
            bytes.extend(frame(1, 4, 3, b"hdrs")); // response headers
            bytes.extend(frame(0, 0, 5, b"grant-41")); // another stream's message
            bytes.extend(frame(0, 0, 3, b"grant-42"));
            write(&t, &mut p, &bytes, step);
            assert!(t.written(id, &waker), "step {step}");
            assert_eq!(t.state.lock().ends.len(), 1);
            write(&t, &mut p, &frame(1, 5, 3, b"trailers"), step);
            assert!(t.state.lock().ends.is_empty());
            t.close();
            assert_eq!(lost.load(Ordering::SeqCst), 0, "step {step}");
        }
    }

    #[test]
    fn a_reset_or_closed_stream_loses_the_delivery() {
        // Reset by the client after the message, before the trailers.
        let t = ConnTracker::default();
        let mut p = FrameParser::new(0);
        let (d, lost) = counted();
        t.register(Bytes::from_static(b"m"), d);
        write(&t, &mut p, &frame(0, 0, 7, b"m"), 3);
        let mut r = FrameParser::new(CLIENT_PREFACE);
        let mut incoming = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        incoming.extend(frame(3, 0, 7, &[0, 0, 0, 8]));
        r.feed(&incoming, |_, _| false, |k, _, s, _| t.read(k, s));
        assert_eq!(lost.load(Ordering::SeqCst), 1);
        // The connection closes with a message written but no end.
        let (d, lost) = counted();
        t.register(Bytes::from_static(b"n"), d);
        write(&t, &mut p, &frame(0, 0, 9, b"n"), 1);
        t.close();
        assert_eq!(lost.load(Ordering::SeqCst), 1);
        // The body went away before its message was written.
        let (d, lost) = counted();
        let id = t.register(Bytes::from_static(b"o"), d);
        drop(t.withdraw(id));
        assert_eq!(lost.load(Ordering::SeqCst), 1);
    }
}
