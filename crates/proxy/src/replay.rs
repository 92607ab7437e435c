//! Keeping a request to send it again. The head is copied; the body is recorded as it streams
//! to the first try (never held back), up to a bound. A retry replays the recorded frames,
//! then goes on reading the client's body where the previous try left it. Past the bound the
//! recording is dropped and the request can no longer be sent again.

use crate::body::{self, Body, BodyError};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What is needed to send a request again.
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// The recorded body; `None` for a request without one.
    tape: Option<Arc<Mutex<Tape>>>,
}

/// The client's body and what was read of it so far.
struct Tape {
    source: Body,
    frames: Vec<Frame<Bytes>>,
    size: u64,
    limit: u64,
    /// Past the limit: the frames are gone, no replay.
    overflow: bool,
    /// Only the newest try's body reads; an older one still held by its connection stops.
    generation: u64,
}

impl Replay {
    /// Prepares `req` to be sent again: `None` when its body is known to exceed `limit` (it
    /// streams as it is). A body of unknown size is recorded up to `limit`.
    pub fn of(req: &mut Request<Body>, limit: u64) -> Option<Replay> {
        let tape = if req.body().is_end_stream() {
            None
        } else {
            if req.body().size_hint().lower() > limit {
                return None;
            }
            let source = std::mem::replace(req.body_mut(), body::empty());
            let tape = Arc::new(Mutex::new(Tape {
                source,
                frames: Vec::new(),
                size: 0,
                limit,
                overflow: false,
                generation: 0,
            }));
            *req.body_mut() = Body::from(Replayed {
                tape: tape.clone(),
                generation: 0,
                next: 0,
            });
            Some(tape)
        };
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            tape,
        })
    }

    /// Whether the request can still be sent again (its body stayed within the bound).
    pub fn available(&self) -> bool {
        self.tape.as_ref().is_none_or(|t| !lock(t).overflow)
    }

    /// The request again, its body replayed from the start.
    pub fn request(&self) -> Request<Body> {
        let body = match &self.tape {
            None => body::empty(),
            Some(t) => {
                let generation = {
                    let mut t = lock(t);
                    t.generation += 1;
                    t.generation
                };
                Body::from(Replayed {
                    tape: t.clone(),
                    generation,
                    next: 0,
                })
            }
        };
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

fn lock(t: &Mutex<Tape>) -> std::sync::MutexGuard<'_, Tape> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// One try's view of the recorded body.
pub struct Replayed {
    tape: Arc<Mutex<Tape>>,
    generation: u64,
    /// The next recorded frame to send.
    next: usize,
}

/// A body whose try was superseded by a retry.
#[derive(Debug, thiserror::Error)]
#[error("request body moved to a retry")]
struct Superseded;

fn copy(f: &Frame<Bytes>) -> Frame<Bytes> {
    match f.data_ref() {
        Some(d) => Frame::data(d.clone()),
        None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
    }
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut t = lock(&this.tape);
        if t.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if !t.overflow && this.next < t.frames.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(copy(&t.frames[this.next - 1]))));
        }
        let frame = match Pin::new(&mut t.source).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            other => return other,
        };
        if !t.overflow {
            t.size += frame.data_ref().map_or(0, |d| d.len() as u64);
            if t.size > t.limit {
                // Too big to keep: this try streams the rest, and no other follows.
                t.overflow = true;
                t.frames = Vec::new();
            } else {
                t.frames.push(copy(&frame));
                this.next += 1;
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let t = lock(&self.tape);
        t.generation == self.generation
            && (t.overflow || self.next >= t.frames.len())
            && t.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let t = lock(&self.tape);
        let rest = t.source.size_hint();
        if t.overflow {
            return rest;
        }
        let done: u64 = t.frames[self.next.min(t.frames.len())..]
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + done);
        if let Some(u) = rest.upper() {
            h.set_upper(u + done);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn post(body: Body) -> Request<Body> {
        Request::post("/x").body(body).unwrap()
    }

    async fn read(b: Body) -> Result<Bytes, BodyError> {
        Ok(b.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn a_small_body_is_replayed_whole_after_each_try() {
        let mut req = post(body::full("hello world"));
        let replay = Replay::of(&mut req, 64).expect("replayable");
        assert_eq!(read(req.into_body()).await.unwrap(), "hello world");
        assert!(replay.available());
        for _ in 0..2 {
            let again = replay.request();
            assert_eq!(again.uri(), "/x");
            assert_eq!(read(again.into_body()).await.unwrap(), "hello world");
        }
    }

    #[tokio::test]
    async fn a_try_that_read_part_of_the_body_leaves_the_rest_to_the_next() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        use tokio_stream::StreamExt;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b)));
        let incoming = crate::body::test_stream(stream);
        let mut req = post(incoming);
        let replay = Replay::of(&mut req, 64).unwrap();
        let mut first = req.into_body();
        tx.send(Bytes::from("ab")).await.unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        // The first try gives up; the retry gets "ab" again, then the rest.
        let second = replay.request().into_body();
        // The superseded try's body stops.
        assert!(first.frame().await.unwrap().is_err());
        tx.send(Bytes::from("cd")).await.unwrap();
        drop(tx);
        assert_eq!(read(second).await.unwrap(), "abcd");
    }

    #[tokio::test]
    async fn a_body_over_the_bound_streams_and_cannot_be_replayed() {
        // Known to be too big: not even recorded.
        let mut req = post(body::full(vec![b'x'; 100]));
        assert!(Replay::of(&mut req, 64).is_none());
        // Of unknown size: recorded until it passes the bound, streamed whole all the same.
        let chunks = (0..4)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'y'; 30]))));
        let mut req = post(crate::body::test_stream(futures_util::stream::iter(chunks)));
        let replay = Replay::of(&mut req, 64).unwrap();
        assert!(replay.available());
        assert_eq!(read(req.into_body()).await.unwrap().len(), 120);
        assert!(!replay.available());
    }
}
