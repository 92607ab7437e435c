//! RequestMirror: copies of a request go to mirror backends as its body streams to its own
//! backend. The body is teed frame by frame (a `Bytes` clone is a reference count), never
//! collected: each copy may fall at most [`LAG_BYTES`] (and [`LAG_FRAMES`]) behind, and a
//! copy that falls further, or whose request fails, is cut off and counted; the request it
//! copies never waits for it. A copy cut off mid-body ends with an error, so its backend
//! never takes a truncated body for a whole one. Copies are not retried, and their responses
//! are read and discarded.

use crate::body::{self, Body, BodyError};
use crate::decide::Forward;
use crate::filters::Mirror;
use crate::metrics::{MirrorDropLabels, RouteLabels};
use crate::server::Shared;
use bytes::Bytes;
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Bytes a copy may fall behind the request before it is cut off: its memory bound.
pub const LAG_BYTES: usize = 256 * 1024;
/// Frames a copy may fall behind (empty frames cost memory too).
pub const LAG_FRAMES: usize = 64;

/// Copies are sent once: a retry would copy the request's effects twice.
static NO_RETRY: LazyLock<Arc<crate::retry::Policy>> = LazyLock::new(|| {
    let mut p = crate::retry::Policy::default();
    p.retries = 0;
    Arc::new(p)
});

/// Starts a copy of the request (head `parts`) for each of `mirrors` drawn by its share, and
/// returns the body to forward: `body` itself, or a tee feeding the copies.
pub(crate) fn start<'a>(
    shared: &Arc<Shared>,
    direction: &'static str,
    route: &Arc<str>,
    mirrors: impl Iterator<Item = &'a Mirror>,
    parts: &http::request::Parts,
    body: Body,
    client: SocketAddr,
) -> Body {
    let mut outs = Vec::new();
    let h2_limits = shared.snapshot().settings.bounds.h2();
    let streamed = !body.is_end_stream();
    for m in mirrors.filter(|m| crate::rand::below(1_000_000) < u64::from(m.per_million)) {
        let link = Arc::new(Link::default());
        let copy_body = if streamed {
            let (tx, rx) = mpsc::channel(LAG_FRAMES);
            outs.push(Out {
                tx,
                link: link.clone(),
            });
            Body::from(CopyBody {
                rx,
                link: link.clone(),
                size: body.size_hint(),
            })
        } else {
            body::empty()
        };
        let mut copy = Request::new(copy_body);
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        let fwd = Forward {
            route: route.clone(),
            rule: None,
            backend_index: None,
            backend: m.backend.clone(),
            prefix_len: 0,
            timeout: m.backend.request_timeout,
            try_timeout: None,
            retry: Some(NO_RETRY.clone()),
            stats: None,
        };
        shared
            .metrics
            .mirrored
            .get_or_create(&RouteLabels {
                direction,
                route: route.clone(),
                backend: m.backend.name.clone(),
            })
            .inc();
        let shared = shared.clone();
        tokio::spawn(async move {
            let sent = crate::http::forward(
                &fwd,
                copy,
                client,
                Instant::now(),
                h2_limits,
                &shared.metrics,
                false,
                None,
            )
            .await;
            let failed = match sent {
                // Read to the end (keeping nothing), so that the connection can be reused.
                Ok((resp, ..)) => {
                    let mut body = resp.into_body();
                    loop {
                        match body.frame().await {
                            None => break false,
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break true,
                        }
                    }
                }
                // A copy refused by the breaker is counted like any other refusal.
                Err(crate::error::ProxyError::Overloaded(backend, limit, _)) => {
                    shared.metrics.breaker_rejected(&backend, limit);
                    true
                }
                Err(_) => true,
            };
            let reason = if link.cut.load(Ordering::Relaxed) {
                "slow"
            } else if failed {
                "failed"
            } else {
                return;
            };
            shared
                .metrics
                .mirror_dropped
                .get_or_create(&MirrorDropLabels {
                    direction,
                    route: fwd.route.clone(),
                    backend: fwd.backend.name.clone(),
                    reason,
                })
                .inc();
        });
    }
    if outs.is_empty() {
        body
    } else {
        Body::from(Tee {
            inner: Box::new(body),
            outs,
        })
    }
}

/// What the tee and one copy share.
#[derive(Default)]
struct Link {
    /// The request's body ended: the copy is whole once it has read what is queued.
    ended: AtomicBool,
    /// The copy fell too far behind and was cut off.
    cut: AtomicBool,
    /// Bytes handed on and not yet read by the copy.
    queued: AtomicUsize,
}

struct Out {
    tx: mpsc::Sender<Frame<Bytes>>,
    link: Arc<Link>,
}

/// The request's body, handing a copy of each frame to the copies still keeping up.
pub struct Tee {
    /// Boxed: a `Body` may be a `Tee` (only mirrored requests pay for the box).
    inner: Box<Body>,
    outs: Vec<Out>,
}

impl Tee {
    fn hand_on(&mut self, frame: &Frame<Bytes>) {
        let len = frame.data_ref().map_or(0, Bytes::len);
        self.outs.retain(|out| {
            let behind = out.link.queued.load(Ordering::Relaxed) + len > LAG_BYTES;
            let copy = match frame.data_ref() {
                Some(d) => Frame::data(d.clone()),
                None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
            };
            let sent = if behind {
                Err(mpsc::error::TrySendError::Full(copy))
            } else {
                out.tx.try_send(copy)
            };
            match sent {
                Ok(()) => {
                    out.link.queued.fetch_add(len, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    out.link.cut.store(true, Ordering::Relaxed);
                    false
                }
                // The copy's request is over (it failed, or its backend answered early).
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// The body ended: every copy still attached is whole.
    fn end(&mut self) {
        for out in self.outs.drain(..) {
            out.link.ended.store(true, Ordering::Relaxed);
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.hand_on(frame);
                // The writer may stop polling once the body says it is done.
                if this.inner.is_end_stream() {
                    this.end();
                }
            }
            Poll::Ready(None) => this.end(),
            // Dropping the senders without `ended` fails the copies.
            Poll::Ready(Some(Err(_))) => this.outs.clear(),
            Poll::Pending => {}
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

/// A copy's body: the frames the tee handed on.
pub struct CopyBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    link: Arc<Link>,
    size: SizeHint,
}

/// A copy's body did not end with the request's.
#[derive(Debug, thiserror::Error)]
#[error("mirrored copy cut off before the request body ended")]
struct CutOff;

impl http_body::Body for CopyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(f)) => {
                let len = f.data_ref().map_or(0, Bytes::len);
                this.link.queued.fetch_sub(len, Ordering::Relaxed);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) if this.link.ended.load(Ordering::Relaxed) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(Box::new(CutOff)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tee(inner: Body, n: usize, lag: usize) -> (Tee, Vec<CopyBody>) {
        let mut outs = Vec::new();
        let mut copies = Vec::new();
        for _ in 0..n {
            let link = Arc::new(Link::default());
            let (tx, rx) = mpsc::channel(lag);
            outs.push(Out {
                tx,
                link: link.clone(),
            });
            copies.push(CopyBody {
                rx,
                link,
                size: SizeHint::default(),
            });
        }
        (
            Tee {
                inner: Box::new(inner),
                outs,
            },
            copies,
        )
    }

    fn chunks(n: usize, size: usize) -> Body {
        let frames = (0..n).map(move |i| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![i as u8; size])))
        });
        body::test_stream(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn copies_that_keep_up_get_the_whole_body_and_its_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from("ab"))),
            Ok(Frame::data(Bytes::from("cd"))),
            Ok(Frame::trailers(trailers)),
        ];
        let (t, copies) = tee(body::test_stream(futures_util::stream::iter(frames)), 2, 4);
        let (a, b) = tokio::join!(
            async {
                let c = Body::from(t).collect().await.unwrap();
                (c.trailers().cloned(), c.to_bytes())
            },
            async {
                let mut out = Vec::new();
                for c in copies {
                    let c = Body::from(c).collect().await.unwrap();
                    out.push((c.trailers().cloned(), c.to_bytes()));
                }
                out
            }
        );
        assert_eq!(a.1, "abcd");
        for copy in b {
            assert_eq!(copy, a);
        }
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_cut_off_and_the_request_goes_on() {
        // Nobody reads the copy: the request's 64 frames of 4 KiB still stream whole.
        let (t, mut copies) = tee(chunks(64, 4096), 1, 4);
        let link = copies[0].link.clone();
        let whole = Body::from(t).collect().await.unwrap().to_bytes();
        assert_eq!(whole.len(), 64 * 4096);
        assert!(link.cut.load(Ordering::Relaxed));
        // What was queued arrives, then an error: never a truncated body passed as whole.
        let copy = Body::from(copies.remove(0));
        assert!(copy.collect().await.is_err());
    }

    #[tokio::test]
    async fn a_copy_more_bytes_behind_than_the_bound_is_cut_off() {
        // Frames to spare, but 2 × 200 KiB unread is over the byte bound.
        let (t, copies) = tee(chunks(3, 200 * 1024), 1, 16);
        let link = copies[0].link.clone();
        assert_eq!(
            Body::from(t).collect().await.unwrap().to_bytes().len(),
            600 * 1024
        );
        assert!(link.cut.load(Ordering::Relaxed));
        // Within the bound, a copy read later is whole.
        let (t, copies) = tee(chunks(3, 64 * 1024), 1, 16);
        assert_eq!(
            Body::from(t).collect().await.unwrap().to_bytes().len(),
            192 * 1024
        );
        for c in copies {
            let whole = Body::from(c).collect().await.unwrap().to_bytes();
            assert_eq!(whole.len(), 192 * 1024);
        }
    }

    #[tokio::test]
    async fn a_request_body_that_fails_fails_its_copies() {
        let frames = vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Err(std::io::Error::other("client went away")),
        ];
        let (t, copies) = tee(body::test_stream(futures_util::stream::iter(frames)), 1, 4);
        assert!(Body::from(t).collect().await.is_err());
        for c in copies {
            assert!(Body::from(c).collect().await.is_err());
        }
    }

    #[tokio::test]
    async fn a_copy_whose_request_ended_is_let_go() {
        let (mut t, mut copies) = tee(chunks(8, 16), 1, 2);
        drop(copies.remove(0));
        let mut n = 0;
        while let Some(f) = t.frame().await {
            f.unwrap();
            n += 1;
        }
        assert_eq!(n, 8);
        assert!(t.outs.is_empty());
    }
}
