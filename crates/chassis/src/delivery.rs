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
//! 2. when the connection has written that stream's end (HEADERS with
//!    END_STREAM), it writes an HTTP/2 PING of its own after it, at the
//!    next frame boundary outside a header block (one PING serves every
//!    stream that ended before it);
//!    the client's HTTP/2 stack answers a PING only after it has read
//!    every frame before it, so the ACK proves the response arrived. A
//!    second PING round follows: a reset the client queued before the
//!    first ACK is written no later than that ACK's flush, so it arrives
//!    before the second ACK;
//! 3. the second ACK disarms the delivery. It is lost when the body is
//!    dropped before step 1 (hyper saw RST_STREAM, or the connection
//!    closed), when an RST_STREAM for the stream is read or written before
//!    the ACKs, and when the connection closes before the stream's end was
//!    written, or when the end is written after the client closed the
//!    connection (EOF or an error on the read side). A connection that
//!    closes after the end was written but before the ACKs keeps it: the
//!    client may have read it, and releasing a lock a client holds is worse
//!    than keeping one it lost.
//!
//! What remains is a client whose gRPC library had received the response
//! when its caller gave up on the call: it was sent the answer, and learns
//! it again by retrying the same request id. (h2, the server's HTTP/2
//! stack, ignores ACKs of PINGs it did not send.)
//!
//! Without a tracked connection (a service mounted outside the chassis'
//! server) the delivery is disarmed when the body ends; if no layer takes
//! an attached delivery at all, it counts as delivered: cleaning up a grant
//! the client holds would be worse than keeping one it lost.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

static KEPT_UNCONFIRMED: AtomicU64 = AtomicU64::new(0);

/// Answers kept although their delivery was never confirmed: the
/// connection closed after their end was written, before the PING rounds
/// (also the metric `dsync_grpc_answers_kept_unconfirmed_total`). The one
/// way a grant can outlive a client that never read it.
pub fn kept_unconfirmed() -> u64 {
    KEPT_UNCONFIRMED.load(Ordering::Relaxed)
}

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
        // The registration of the message frame, once yielded: while it is
        // set, the trailers are not polled (step 1).
        registered: Option<u64>,
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
        self.registered.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Largest message matched byte for byte; a larger answer (none carries a
/// grant here) is counted as delivered when it is registered.
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
    /// DATA written per stream while a message is awaited (flow control
    /// may split a message over frames); `None` once past the limit.
    written_data: HashMap<u32, Option<Vec<u8>>>,
    /// Streams whose end was written, waiting for PING acknowledgements.
    acks: Vec<Unacked>,
    /// A PING must be written at the next frame boundary.
    ping_due: bool,
    /// The client closed the connection (its side read EOF or an error):
    /// anything written from now on is not read.
    peer_closed: bool,
    last_ping: u32,
}

struct Unacked {
    stream: u32,
    delivery: Delivery,
    /// The PING whose ACK counts (0: the next one written).
    ping: u32,
    /// ACKs still needed.
    left: u8,
}

/// PING rounds a delivery waits for (see the module doc, step 2).
const PING_ROUNDS: u8 = 2;
/// Our PINGs' payload: this prefix, then a sequence number.
const PING_MAGIC: &[u8; 4] = b"dsyn";

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
            // Too large to match (see the const); an id `written` does not
            // know counts as written.
            delivery.disarm();
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

    /// The PING frame to write now, if one is due.
    fn take_ping(&self) -> Option<[u8; 17]> {
        let mut s = self.state.lock();
        if !s.ping_due {
            return None;
        }
        s.ping_due = false;
        s.last_ping = s.last_ping.wrapping_add(1).max(1);
        let seq = s.last_ping;
        for u in s.acks.iter_mut().filter(|u| u.ping == 0) {
            u.ping = seq;
        }
        let mut f = [0u8; 17];
        f[2] = 8; // length
        f[3] = FRAME_PING;
        f[9..13].copy_from_slice(PING_MAGIC);
        f[13..].copy_from_slice(&seq.to_be_bytes());
        Some(f)
    }

    /// The client acknowledged our PING `seq` (and so every one before it).
    fn acked(&self, seq: u32) {
        let mut s = self.state.lock();
        let mut done = Vec::new();
        let mut again = false;
        let mut i = 0;
        while i < s.acks.len() {
            let u = &mut s.acks[i];
            if u.ping != 0 && u.ping <= seq {
                u.left -= 1;
                if u.left == 0 {
                    done.push(s.acks.swap_remove(i).delivery);
                    continue;
                }
                u.ping = 0;
                again = true;
            }
            i += 1;
        }
        s.ping_due |= again;
        drop(s);
        for d in done {
            d.disarm();
        }
    }

    /// Stream `stream` was reset: whatever it carried was not delivered.
    fn reset(&self, stream: u32) {
        let mut s = self.state.lock();
        s.written_data.remove(&stream);
        let mut lost: Vec<Delivery> = s.ends.remove(&stream).into_iter().collect();
        while let Some(pos) = s.acks.iter().position(|u| u.stream == stream) {
            lost.push(s.acks.swap_remove(pos).delivery);
        }
        drop(s);
        drop(lost);
    }

    fn ended(&self, stream: u32) {
        let mut s = self.state.lock();
        if s.peer_closed {
            // Written after the client closed: it never read it.
            let lost = s.ends.remove(&stream);
            drop(s);
            drop(lost);
            return;
        }
        if let Some(delivery) = s.ends.remove(&stream) {
            s.acks.push(Unacked {
                stream,
                delivery,
                ping: 0,
                left: PING_ROUNDS,
            });
            s.ping_due = true;
        }
    }

    /// A whole frame went out on the socket.
    fn wrote(&self, kind: u8, stream: u32, payload: Option<&[u8]>, ends_stream: bool) {
        match kind {
            FRAME_DATA => self.wrote_data(stream, payload),
            FRAME_RST_STREAM => {
                self.reset(stream);
                return;
            }
            _ => {}
        }
        if ends_stream {
            self.state.lock().written_data.remove(&stream);
            self.ended(stream);
        }
    }

    /// Matches a stream's DATA so far against the awaited messages.
    fn wrote_data(&self, stream: u32, payload: Option<&[u8]>) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        if !s.pending.iter().any(|p| !p.written) {
            s.written_data.clear();
            return;
        }
        let so_far = s
            .written_data
            .entry(stream)
            .or_insert_with(|| Some(Vec::new()));
        match (so_far.as_mut(), payload) {
            (Some(buf), Some(p)) if buf.len() + p.len() <= MAX_TRACKED_MESSAGE => {
                buf.extend_from_slice(p)
            }
            _ => {
                *so_far = None;
                return;
            }
        }
        let data = so_far.as_deref().expect("just extended");
        let Some(pos) = s
            .pending
            .iter()
            .position(|p| !p.written && p.data.as_ref() == data)
        else {
            return;
        };
        s.written_data.remove(&stream);
        let p = &mut s.pending[pos];
        p.written = true;
        let delivery = p.delivery.take();
        if let Some(w) = p.waker.take() {
            w.wake();
        }
        if let Some(d) = delivery {
            s.ends.insert(stream, d);
        }
    }

    /// A whole frame came in from the client.
    fn read(&self, kind: u8, flags: u8, stream: u32, payload: Option<&[u8]>) {
        match (kind, payload) {
            (FRAME_RST_STREAM, _) => self.reset(stream),
            (FRAME_PING, Some(p))
                if flags & FLAG_ACK != 0 && p.len() == 8 && &p[..4] == PING_MAGIC =>
            {
                self.acked(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            _ => {}
        }
    }

    /// The client closed its side of the connection.
    fn peer_closed(&self) {
        self.state.lock().peer_closed = true;
    }

    /// The connection is gone. A stream whose end was never written was
    /// not delivered (a gRPC response without trailers is an error to the
    /// client). One whose end was written but not yet confirmed may have
    /// been read: it is kept, as releasing a lock its client holds would be
    /// worse than keeping one it lost.
    fn close(&self) {
        let mut s = self.state.lock();
        let lost: Vec<Delivery> = s.ends.drain().map(|(_, d)| d).collect();
        let kept: Vec<Delivery> = s.acks.drain(..).map(|u| u.delivery).collect();
        drop(s);
        drop(lost);
        if !kept.is_empty() {
            KEPT_UNCONFIRMED.fetch_add(kept.len() as u64, Ordering::Relaxed);
            metrics::counter!("dsync_grpc_answers_kept_unconfirmed_total")
                .increment(kept.len() as u64);
        }
        kept.into_iter().for_each(Delivery::disarm);
    }
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_PUSH_PROMISE: u8 = 5;
const FRAME_PING: u8 = 6;
const FRAME_CONTINUATION: u8 = 9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const CLIENT_PREFACE: usize = 24;

/// Splits one direction of an HTTP/2 connection into frames as its bytes
/// go by (they arrive in arbitrary pieces).
#[derive(Clone)]
struct FrameParser {
    skip_preface: usize,
    head: [u8; 9],
    head_len: usize,
    remaining: usize,
    capture: Option<Vec<u8>>,
    /// An open header block (HEADERS without END_HEADERS, then
    /// CONTINUATIONs): whether it ends its stream. Nothing may be written
    /// between its frames.
    block: Option<bool>,
}

/// Whether a frame (with the header block state before it) ends its
/// stream, and the block state after it.
fn frame_ends(kind: u8, flags: u8, block: Option<bool>) -> (bool, Option<bool>) {
    let end_headers = flags & FLAG_END_HEADERS != 0;
    match kind {
        FRAME_DATA => (flags & FLAG_END_STREAM != 0, block),
        FRAME_HEADERS | FRAME_PUSH_PROMISE if !end_headers => (
            false,
            Some(kind == FRAME_HEADERS && flags & FLAG_END_STREAM != 0),
        ),
        FRAME_HEADERS => (flags & FLAG_END_STREAM != 0, None),
        FRAME_CONTINUATION if end_headers => (block.unwrap_or(false), None),
        _ => (false, block),
    }
}

impl FrameParser {
    fn new(skip_preface: usize) -> Self {
        Self {
            skip_preface,
            head: [0; 9],
            head_len: 0,
            remaining: 0,
            capture: None,
            block: None,
        }
    }

    fn at_boundary(&self) -> bool {
        self.skip_preface == 0 && self.head_len == 0 && self.block.is_none()
    }

    /// Feeds bytes; `capture(kind, len)` says whether to keep a frame's
    /// payload; `frame(kind, flags, stream, payload, ends_stream)` sees each
    /// whole frame.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        capture: impl Fn(u8, usize) -> bool,
        mut frame: impl FnMut(u8, u8, u32, Option<&[u8]>, bool),
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
                let (ends, after) = frame_ends(h[3], h[4], self.block);
                self.block = after;
                frame(h[3], h[4], stream, self.capture.take().as_deref(), ends);
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
    /// Our PING, written between h2's frames before any more of them.
    ping: Vec<u8>,
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
            ping: Vec::new(),
        }
    }

    /// Writes a due PING (at a frame boundary only) before anything else.
    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ping.is_empty() && self.out.at_boundary() {
            if let Some(f) = self.tracker.take_ping() {
                self.ping.extend_from_slice(&f);
            }
        }
        while !self.ping.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.ping))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.ping.drain(..n);
        }
        Poll::Ready(Ok(()))
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
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.tracker.peer_closed();
            }
            Poll::Ready(Err(_)) => self.tracker.peer_closed(),
            _ => {}
        }
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let tracker = &this.tracker;
            this.incoming.feed(
                &buf.filled()[before..],
                |kind, len| kind == FRAME_PING && len == 8,
                |kind, flags, stream, payload, _| tracker.read(kind, flags, stream, payload),
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
        let this = &mut *self;
        std::task::ready!(this.poll_ping(cx))?;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let tracker = &this.tracker;
            this.out.feed(
                &buf[..*n],
                |kind, len| {
                    kind == FRAME_DATA && len <= MAX_TRACKED_MESSAGE && tracker.wants_data()
                },
                |kind, _, stream, payload, ends| tracker.wrote(kind, stream, payload, ends),
            );
            // Best effort now; poll_flush and the next write finish it.
            let _ = this.poll_ping(cx);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_ping(cx))?;
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
                |k, _, s, b, e| t.wrote(k, s, b, e),
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
            // Two PING rounds confirm it; an ACK of another payload does not.
            let mut r = FrameParser::new(0);
            let mut ack = |seq: u32, magic: &[u8; 4]| {
                let mut payload = magic.to_vec();
                payload.extend(seq.to_be_bytes());
                r.feed(
                    &frame(6, 1, 0, &payload),
                    |k, l| k == FRAME_PING && l == 8,
                    |k, f, s, b, _| t.read(k, f, s, b),
                );
            };
            let p1 = t.take_ping().expect("a PING follows the end");
            assert_eq!(&p1[9..13], PING_MAGIC);
            ack(1, b"user");
            ack(1, PING_MAGIC);
            assert_eq!(t.state.lock().acks.len(), 1, "one round is not enough");
            assert!(t.take_ping().is_some());
            ack(2, PING_MAGIC);
            assert!(t.state.lock().acks.is_empty());
            assert!(t.take_ping().is_none());
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
        r.feed(&incoming, |_, _| false, |k, f, s, b, _| t.read(k, f, s, b));
        assert_eq!(lost.load(Ordering::SeqCst), 1);
        // Reset after its end was written but before the PING was acked.
        let (d, lost) = counted();
        t.register(Bytes::from_static(b"q"), d);
        write(&t, &mut p, &frame(0, 0, 11, b"q"), 2);
        write(&t, &mut p, &frame(1, 5, 11, b"t"), 2);
        assert!(t.take_ping().is_some());
        r.feed(
            &frame(3, 0, 11, &[0, 0, 0, 8]),
            |_, _| false,
            |k, f, s, b, _| t.read(k, f, s, b),
        );
        assert_eq!(lost.load(Ordering::SeqCst), 1);
        // The connection closes with a message written but no end: lost;
        // with its end written but unconfirmed: kept (it may have been read).
        let (d, lost) = counted();
        t.register(Bytes::from_static(b"n"), d);
        write(&t, &mut p, &frame(0, 0, 9, b"n"), 1);
        let (d2, lost2) = counted();
        t.register(Bytes::from_static(b"n2"), d2);
        write(&t, &mut p, &frame(0, 0, 13, b"n2"), 1);
        write(&t, &mut p, &frame(1, 5, 13, b"t"), 1);
        t.close();
        assert_eq!(lost.load(Ordering::SeqCst), 1);
        assert_eq!(lost2.load(Ordering::SeqCst), 0);
        // The body went away before its message was written.
        let (d, lost) = counted();
        let id = t.register(Bytes::from_static(b"o"), d);
        drop(t.withdraw(id));
        assert_eq!(lost.load(Ordering::SeqCst), 1);
    }
}

#[cfg(test)]
mod framing_tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        v.extend([kind, flags]);
        v.extend(stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_message_split_by_flow_control_still_matches() {
        let t = ConnTracker::default();
        let mut p = FrameParser::new(0);
        let id = t.register(Bytes::from_static(b"0123456789"), Delivery::new(|| {}));
        let mut bytes = frame(FRAME_DATA, 0, 5, b"0123");
        bytes.extend(frame(FRAME_DATA, 0, 7, b"0123456789-other-stream"));
        bytes.extend(frame(FRAME_DATA, 0, 5, b"456789"));
        p.feed(
            &bytes,
            |kind, len| kind == FRAME_DATA && len <= MAX_TRACKED_MESSAGE && t.wants_data(),
            |k, _, s, b, e| t.wrote(k, s, b, e),
        );
        assert!(t.written(id, &futures::task::noop_waker()));
        assert!(t.state.lock().ends.contains_key(&5));
    }

    #[test]
    fn nothing_is_written_inside_a_header_block() {
        let mut p = FrameParser::new(0);
        // HEADERS ending the stream but not the header block, then its
        // CONTINUATION: the stream ends with the CONTINUATION.
        let bytes = frame(FRAME_HEADERS, FLAG_END_STREAM, 3, b"part");
        let cont = frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, b"rest");
        let mut ended = Vec::new();
        p.feed(&bytes, |_, _| false, |_, _, s, _, e| ended.push((s, e)));
        assert!(!p.at_boundary(), "a PING here would split the header block");
        p.feed(&cont, |_, _| false, |_, _, s, _, e| ended.push((s, e)));
        assert!(p.at_boundary());
        assert_eq!(ended, vec![(3, false), (3, true)]);
        // A header block that ends the stream in one frame.
        let whole = frame(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 5, b"t");
        p.feed(&whole, |_, _| false, |_, _, s, _, e| ended.push((s, e)));
        assert_eq!(ended.last(), Some(&(5, true)));
    }
}
