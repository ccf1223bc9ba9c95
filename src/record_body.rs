//! The recording response body: streams the inner body to the client while a copy
//! accumulates, and releases the end of the response only once the record is stored.
//!
//! "The end" is whatever tells the client it has everything: the frame that carries the
//! trailers, the frame after which the inner body reports its end, the frame that completes
//! a declared `Content-Length` (after which an HTTP/1.1 server stops polling the body), or
//! the end itself. That frame is held back while the record is stored (within the
//! store-call bound), so a client that has the whole response and retries at once always
//! meets the stored record, never `409`. A head that says there is no body (`204`, `304`,
//! `Content-Length: 0`, an answer to `HEAD`) is the whole response: it is stored before it
//! leaves, and its body is not read.
//!
//! The server frames the response by the head, or by the exact size this body tells it
//! once the inner body has ended. It is told none while an error is still to come, or when
//! the body is not the length its head declared: the server then does what it does without
//! the layer (cuts the body off, or ends the connection), and the recording is settled as a
//! failed body.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::claim::Claimed;
use crate::handle::MayHaveRun;
use crate::policy::{Disconnect, storable_fields};
use crate::record::{Fields, Record};
use crate::tasks::DetachedWork;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The live response body of an operation's first run.
pub(crate) struct Recorder<B> {
    inner: Option<Pin<Box<B>>>,
    recording: Option<Recording>,
    completing: Option<BoxFuture>,
    /// Frames that end the response, held until the record is stored.
    held: Frames,
    /// Frames read before the response head left ([`Recorder::prime`]), given out first.
    ready: Frames,
    /// An error the inner body gave while priming (a `B::Error`), given out after `ready`.
    ready_error: Option<Box<dyn Any + Send>>,
    /// The body's length as declared up front (`Content-Length` or an exact size hint).
    declared: Option<u64>,
    sent: u64,
    /// Set while the inner body is being polled: still set in `drop` if it panicked.
    polling: bool,
    /// Already draining on a task of its own: dropped again (its runtime shutting down),
    /// it settles the claim instead of draining once more.
    detached: bool,
    /// Where the record's storing goes on if the body is dropped meanwhile (set with it).
    work: Option<DetachedWork>,
    drain: fn(Pin<Box<B>>, Recording),
}

/// Frames in order. Most bodies hold one frame at a time (a whole JSON answer, its
/// trailers): that one is kept inline, without an allocation.
#[derive(Default)]
struct Frames {
    first: Option<Frame<Bytes>>,
    more: VecDeque<Frame<Bytes>>,
}

impl Frames {
    fn push_back(&mut self, frame: Frame<Bytes>) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(frame);
        } else {
            self.more.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Frame<Bytes>> {
        self.first.take().or_else(|| self.more.pop_front())
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_empty()
    }

    fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }

    /// The bytes of the data frames held. (The frame kept inline is looked at without
    /// walking the queue, which most bodies leave empty: `size_hint` asks this of every
    /// first response.)
    fn data_len(&self) -> u64 {
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        if self.more.is_empty() {
            return first;
        }
        first
            + self
                .more
                .iter()
                .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                .sum::<u64>()
    }

    /// Whether a trailers frame is held.
    fn has_trailers(&self) -> bool {
        self.first.as_ref().is_some_and(Frame::is_trailers)
            || (!self.more.is_empty() && self.more.iter().any(Frame::is_trailers))
    }
}

/// What is being recorded, and the claim it will settle.
pub(crate) struct Recording {
    claimed: Claimed,
    status: StatusCode,
    headers: Fields,
    /// Whether the answer is a gRPC one (its content type).
    grpc: bool,
    /// The body's first chunk, and the others (most bodies are one chunk: no allocation).
    first: Option<Bytes>,
    chunks: Vec<Bytes>,
    len: usize,
    overflow: bool,
    /// Boxed, as the record's: rare, and the recording is moved as it is stored.
    trailers: Option<Box<HeaderMap>>,
    /// The answer carried [`MayHaveRun`]: stored whatever its status.
    may_have_run: bool,
    /// The answer carried [`DeliverOnce`](crate::DeliverOnce): a tombstone is kept instead.
    deliver_once: bool,
    /// The answer is a [`FunctionAnswer`]: whether it is kept, whatever the layer's status
    /// policies say.
    function: Option<bool>,
}

/// The mark of an answer of [`function`](crate::function)'s runner, which stands for an
/// operation's result with an HTTP response: whether the result is kept (`Ok`, or a result
/// that could not be encoded) or the key released (`Err`, unless past its commit point).
/// The layer's HTTP policies (`storable_when`, `maybe_ran_when`, `replay_headers`) are for
/// HTTP answers, and do not apply: all of its headers are kept for replay.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FunctionAnswer {
    pub(crate) keep: bool,
}

impl<B> Recorder<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    /// A recorder in a box, made in a frame of its own: made inline, its 624 bytes would be
    /// part of the frame of the operation's every poll, and everything the recorder calls
    /// as it stores the record (on the first poll) would run that much deeper in the stack.
    ///
    /// `head`: the answer is to a `HEAD` request, which has no body whatever its head says
    /// (its `Content-Length` is the length a `GET` would have): a server sends the head
    /// alone.
    #[inline(never)]
    pub(crate) fn boxed(
        body: B,
        parts: &http::response::Parts,
        claimed: Claimed,
        head: bool,
    ) -> Box<Self> {
        Box::new(Self::new(body, parts, claimed, head))
    }

    fn new(body: B, parts: &http::response::Parts, claimed: Claimed, head: bool) -> Self {
        let config = claimed.config();
        let function = parts.extensions.get::<FunctionAnswer>().map(|f| f.keep);
        let headers = if function.is_some() {
            storable_fields(&parts.headers, |_| true)
        } else {
            replayed_headers(config, &parts.headers)
        };
        let declared = if head {
            Some(0)
        } else {
            parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .or_else(|| body.size_hint().exact())
        };
        Self {
            inner: Some(Box::pin(body)),
            recording: Some(Recording {
                claimed,
                status: parts.status,
                grpc: headers.is_grpc(),
                headers,
                first: None,
                chunks: Vec::new(),
                len: 0,
                overflow: false,
                trailers: None,
                may_have_run: parts.extensions.get::<MayHaveRun>().is_some(),
                deliver_once: parts
                    .extensions
                    .get::<crate::handle::DeliverOnce>()
                    .is_some(),
                function,
            }),
            completing: None,
            held: Frames::default(),
            ready: Frames::default(),
            ready_error: None,
            declared,
            sent: 0,
            polling: false,
            detached: false,
            work: None,
            drain: drain::<B>,
        }
    }

    /// Reads what the inner body has ready before the response head leaves: up to 16 frames
    /// or 64 KiB, and, if that is the whole body, waits for the record too. A body that is
    /// complete at once (a JSON answer, a unary gRPC message with its trailers, a response
    /// without frames) then leaves in one piece, head and end together, after the record is
    /// stored: one write, so Nagle's algorithm on the connection cannot hold the last bytes
    /// back for a delayed acknowledgement, and a trailers-only gRPC answer stays a single
    /// HEADERS frame. A body that is not ready streams as it comes.
    pub(crate) async fn prime(&mut self)
    where
        B::Error: Send,
    {
        const MAX_FRAMES: usize = 16;
        const MAX_BYTES: usize = 64 * 1024;
        // A head that says there is no body (a `204`, a `304`, `Content-Length: 0`, an
        // answer to `HEAD`) is all a server sends: it never reads the body, and drops it.
        // So the recording does not read it either: the answer is stored as its head says,
        // before the head leaves (otherwise a body whose end came later was dropped unread,
        // and its key was released or answered `409` after the client had the whole
        // answer).
        if self.inner.is_some()
            && let Some(recording) = &self.recording
            && (matches!(
                recording.status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
            ) || self.declared == Some(0))
        {
            self.finish();
        }
        let mut bytes = 0usize;
        std::future::poll_fn(|cx| {
            loop {
                if self.ready.len() >= MAX_FRAMES || bytes >= MAX_BYTES {
                    return Poll::Ready(());
                }
                match self.poll_next(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        bytes += frame.data_ref().map_or(0, Bytes::len);
                        self.ready.push_back(frame);
                    }
                    Poll::Ready(Some(Err(err))) => {
                        self.ready_error = Some(Box::new(err));
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => return Poll::Ready(()),
                    // The whole body is in hand and its record is being stored: wait.
                    Poll::Pending if self.completing.is_some() => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(()),
                }
            }
        })
        .await;
    }
}

impl<B> Recorder<B> {
    /// The inner body ended: start storing.
    fn finish(&mut self) {
        self.inner = None;
        // The record is made from the recording where it lies (in the recorder's box), not
        // from a copy of it on the stack, which every call below would sit under.
        let Some(recording) = self.recording.as_mut() else {
            return;
        };
        let (record, settle) = recording.outcome();
        // Stored at once when the store answers at once (the embedded memory store):
        // no future to box and poll.
        let record = match settle {
            Settle::Complete => match recording.claimed.complete_now(record) {
                Ok(()) => {
                    self.recording = None;
                    return;
                }
                Err(record) => record,
            },
            Settle::Release => record,
        };
        if let Some(recording) = self.recording.take() {
            self.settle_later(settle, recording.claimed, record);
        }
    }

    /// Boxes the store call that did not end at once, for `poll_next` to drive.
    ///
    /// Out of line: the future is built on the stack before it is boxed, and inlined, its
    /// kilobytes would be part of the frame of `finish` and `poll_next` on every first
    /// request, pushing what they call onto cache lines nothing else touches. (Not marked
    /// cold: with a store across the network, every first request comes here.)
    #[inline(never)]
    fn settle_later(&mut self, settle: Settle, claimed: Claimed, record: Record) {
        self.work = Some(claimed.config().work.clone());
        self.completing = Some(Box::pin(settle.apply(claimed, record)));
    }
}

/// Drains a body whose client went away, on a tracked task, and stores its outcome.
fn drain<B>(inner: Pin<Box<B>>, recording: Recording)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    let work = recording.claimed.config().work.clone();
    let mut recorder = Recorder {
        inner: Some(inner),
        recording: Some(recording),
        completing: None,
        held: Frames::default(),
        ready: Frames::default(),
        ready_error: None,
        declared: None,
        sent: 0,
        polling: false,
        detached: true,
        work: None,
        drain: drain::<B>,
    };
    work.spawn("drain", async move {
        while let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(&mut recorder).poll_frame(cx)).await
        {
            if frame.is_err() {
                break;
            }
        }
    });
}

impl Recording {
    /// Settles a body that failed or panicked, on a tracked task.
    ///
    /// Out of line, for the reason given at [`Recorder::settle_later`].
    #[cold]
    #[inline(never)]
    fn fail_later(self, what: &'static str) {
        let work = self.claimed.config().work.clone();
        work.spawn(what, self.fail());
    }

    fn observe(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            if self.overflow {
                return;
            }
            self.len += data.len();
            if self.len > self.claimed.config().max_response_body {
                self.overflow = true;
                self.first = None;
                self.chunks = Vec::new();
            } else if !data.is_empty() {
                if self.first.is_none() {
                    self.first = Some(data.clone());
                } else {
                    self.chunks.push(data.clone());
                }
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            match &mut self.trailers {
                Some(existing) => existing.extend(trailers.clone()),
                None => self.trailers = Some(Box::new(trailers.clone())),
            }
        }
    }

    /// For a gRPC answer (HTTP 200 with a gRPC content type): its `grpc-status`, from the
    /// trailers or (trailers-only) the headers; `Some(None)` when it has none.
    fn grpc_code(&self) -> Option<Option<u32>> {
        if !(self.grpc && self.status == StatusCode::OK) {
            return None;
        }
        Some(
            self.trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| self.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok()),
        )
    }

    fn storable(&self) -> bool {
        if let Some(keep) = self.function {
            return keep;
        }
        let config = self.claimed.config();
        match self.grpc_code() {
            Some(code) => code.is_some_and(|c| (config.grpc_storable)(c)),
            None => (config.storable)(self.status),
        }
    }

    /// Whether the answer says the operation was cut off midway (a timeout inside the
    /// layer: HTTP `408`, gRPC `DEADLINE_EXCEEDED` by default): it may have run, so its key
    /// must not be released.
    fn maybe_ran(&self) -> bool {
        if self.function.is_some() {
            return false;
        }
        let config = self.claimed.config();
        match self.grpc_code() {
            Some(code) => code.is_some_and(|c| (config.grpc_maybe_ran)(c)),
            None => !self.grpc && (config.maybe_ran)(self.status),
        }
    }

    /// The body ended: the outcome to store, or to release the key with if it is not
    /// storable (a key past its commit point is not released: the answer is stored after
    /// all). What it is made of is taken out of the recording, which keeps its claim.
    fn outcome(&mut self) -> (Record, Settle) {
        let fingerprint = self.claimed.fingerprint();
        // Decided before anything is taken: both look at the headers and trailers.
        let maybe_ran = self.maybe_ran();
        // A gRPC answer that ended without a status (a broken one) is kept as it came: the
        // service answered, so it may have run, and a retry gets what the first client got.
        let settle = if maybe_ran
            || self.storable()
            || self.may_have_run
            || self.grpc_code() == Some(None)
        {
            Settle::Complete
        } else {
            Settle::Release
        };
        let headers = std::mem::take(&mut self.headers);
        if maybe_ran {
            let record = Record::tombstone_of(self.status, headers).with_fingerprint(fingerprint);
            return (record, Settle::Complete);
        }
        let record = if self.deliver_once {
            let withheld = Fields::one(
                crate::handle::WITHHELD_HEADER,
                http::HeaderValue::from_static("1"),
            );
            Record::tombstone_of(self.status, withheld)
        } else if self.overflow {
            Record::tombstone_of(self.status, headers)
        } else {
            let body = match (self.first.take(), self.chunks.is_empty()) {
                (None, _) => Bytes::new(),
                (Some(first), true) => first,
                (Some(first), false) => {
                    let mut buf = BytesMut::with_capacity(self.len);
                    buf.extend_from_slice(&first);
                    for chunk in &self.chunks {
                        buf.extend_from_slice(chunk);
                    }
                    buf.freeze()
                }
            };
            Record::of_fields(self.status, headers, body, self.trailers.take())
        }
        .with_fingerprint(fingerprint);
        (record, settle)
    }

    /// The body failed (or panicked) midway. A status that is not storable releases the
    /// key, so a retry runs (unless the operation committed); otherwise the operation ran
    /// but its response is broken, and a tombstone keeps it from running twice.
    async fn fail(self) {
        // A gRPC answer that failed before its status: the service answered, so it may have
        // run; its key is not released (a tombstone is kept), as for an HTTP answer whose
        // status is stored.
        let release = !self.storable()
            && !self.maybe_ran()
            && !self.may_have_run
            && self.grpc_code() != Some(None);
        let fingerprint = self.claimed.fingerprint();
        let record = Record::tombstone_of(self.status, self.headers).with_fingerprint(fingerprint);
        if release {
            self.claimed.release(Some(record)).await;
        } else {
            self.claimed.complete(record).await;
        }
    }
}

/// What to do with an operation's outcome.
enum Settle {
    Complete,
    Release,
}

impl Settle {
    async fn apply(self, claimed: Claimed, record: Record) {
        match self {
            Settle::Complete => claimed.complete(record).await,
            Settle::Release => claimed.release(Some(record)).await,
        }
    }
}

/// The headers of an answer that are kept for replay: not the connection's own (the
/// hop-by-hop set and whatever its `Connection` header names), not its framing
/// (`Content-Length`, `Transfer-Encoding`), not `Date`, and chosen by the layer's filter
/// ([`default_replay_header`](crate::policy::default_replay_header) unless set). Both the
/// handler's answers and the recovery hook's are kept through this.
pub(crate) fn replayed_headers(config: &crate::runtime::Runtime, all: &HeaderMap) -> Fields {
    match &config.replay_header {
        // A gRPC answer's own fields are kept whatever the filter says: without its content
        // type it would be judged as an HTTP answer (a trailers-only `UNAVAILABLE` stored as
        // a `200`), and without its status a replay would be a gRPC answer with none.
        Some(f) if crate::problem::is_grpc(all) => {
            storable_fields(all, |name| f(name) || is_grpc_own(name))
        }
        Some(f) => storable_fields(all, |name| f(name)),
        None => storable_fields(all, crate::policy::default_replay_header),
    }
}

/// The fields that make an answer a gRPC one and say how its call ended.
fn is_grpc_own(name: &http::HeaderName) -> bool {
    name == http::header::CONTENT_TYPE
        || matches!(
            name.as_str(),
            "grpc-status" | "grpc-message" | "grpc-status-details-bin"
        )
}

impl<B> Recorder<B>
where
    B: Body<Data = Bytes>,
{
    /// The recording logic: the next frame for the client, holding back the end until the
    /// record is stored.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self;
        loop {
            if let Some(completing) = &mut this.completing {
                ready!(completing.as_mut().poll(cx));
                this.completing = None;
            }
            let Some(inner) = &mut this.inner else {
                return Poll::Ready(this.held.pop_front().map(Ok));
            };
            this.polling = true;
            let polled = inner.as_mut().poll_frame(cx);
            this.polling = false;
            match ready!(polled) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.sent += data.len() as u64;
                    }
                    if let Some(recording) = &mut this.recording {
                        recording.observe(&frame);
                    }
                    if frame.is_trailers() || inner.is_end_stream() {
                        this.held.push_back(frame);
                        this.ended();
                        continue;
                    }
                    // The declared length is complete: an HTTP/1.1 server stops here, so
                    // this frame waits for the end of the inner body and the record.
                    if !this.held.is_empty() || this.declared.is_some_and(|d| this.sent >= d) {
                        this.held.push_back(frame);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(err)) => {
                    this.inner = None;
                    this.held.clear();
                    if let Some(recording) = this.recording.take() {
                        recording.fail_later("settle a failed body");
                    }
                    return Poll::Ready(Some(Err(err)));
                }
                None => this.ended(),
            }
        }
    }

    /// The inner body ended. A body whose length is not the one its head declared is a
    /// broken answer: the server frames it by the head, as it would without the layer
    /// (it cuts it short, or ends the connection), so the client does not get it whole,
    /// and it is settled as a failed body (a tombstone, or the key released for a status
    /// that is not stored), never stored as if it were whole. Any other is stored.
    fn ended(&mut self) {
        if self.declared.is_some_and(|d| d != self.sent) {
            self.inner = None;
            if let Some(recording) = self.recording.take() {
                recording.fail_later("settle a body that is not the length its head declared");
            }
            return;
        }
        self.finish();
    }
}

impl<B> Body for Recorder<B>
where
    B: Body<Data = Bytes> + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.ready_error.take() {
            // Put there by `prime` from this very body, so it is a `B::Error`.
            if let Ok(err) = err.downcast::<B::Error>() {
                return Poll::Ready(Some(Err(*err)));
            }
        }
        this.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
            && self.completing.is_none()
            && self.held.is_empty()
            && self.ready.is_empty()
            && self.ready_error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.data_len() + self.ready.data_len();
        match &self.inner {
            Some(inner) => {
                let hint = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(held));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(held));
                }
                out
            }
            // A body that ends with trailers gets no exact length: hyper would turn it into
            // a `content-length` the service's own answer did not have (gRPC never sends
            // one, and a client reading by length can stop before the trailers).
            // Nor a body with an error still to give (read ahead by `prime`), nor one whose
            // length is not the one its head declared: an HTTP/1.1 server takes an exact
            // hint as the body's length and frames the answer by it, so the error would
            // never be seen (a failed body would look whole) and a wrong length would leave
            // the client waiting for bytes that never come, or with stray bytes on its
            // connection. Without one, the server frames it by its head, as it would
            // without the layer.
            None if self.held.has_trailers()
                || self.ready.has_trailers()
                || self.ready_error.is_some()
                || self.declared.is_some_and(|d| d != self.sent) =>
            {
                let mut out = SizeHint::new();
                out.set_lower(held);
                out
            }
            None => SizeHint::with_exact(held),
        }
    }
}

impl<B> Drop for Recorder<B> {
    fn drop(&mut self) {
        if let Some(completing) = self.completing.take() {
            // The client went away while the record was being stored: finish storing.
            if let Some(work) = &self.work {
                work.spawn("store", completing);
            }
            return;
        }
        let Some(recording) = self.recording.take() else {
            return;
        };
        if self.polling {
            // The inner body panicked: never poll it again; settle the claim once.
            self.inner = None;
            recording.fail_later("settle a panicked body");
            return;
        }
        match (recording.claimed.config().disconnect, self.inner.take()) {
            (Disconnect::Finish, Some(inner)) if !self.detached => (self.drain)(inner, recording),
            // Dropping the claim releases it.
            _ => drop(recording),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![b'x'; n]))
    }

    fn trailers() -> Frame<Bytes> {
        Frame::trailers(HeaderMap::new())
    }

    /// The held frames' length and trailers are found wherever the frames sit: the one
    /// kept inline, the queue behind it, or both (what `size_hint` reports from).
    #[test]
    fn held_frames_are_counted_inline_and_queued() {
        let mut frames = Frames::default();
        assert_eq!((frames.data_len(), frames.has_trailers()), (0, false));
        frames.push_back(data(3));
        assert_eq!((frames.data_len(), frames.has_trailers()), (3, false));
        frames.push_back(data(4));
        frames.push_back(trailers());
        assert_eq!((frames.data_len(), frames.has_trailers()), (7, true));
        // The inline frame taken: the queue alone is looked at.
        assert_eq!(
            frames
                .pop_front()
                .and_then(|f| f.into_data().ok())
                .map(|d| d.len()),
            Some(3)
        );
        assert_eq!((frames.data_len(), frames.has_trailers()), (4, true));
        frames.clear();
        frames.push_back(trailers());
        assert_eq!((frames.data_len(), frames.has_trailers()), (0, true));
    }
}
