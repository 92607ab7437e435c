//! Streams that make no progress are reset: an HTTP/2 stream whose client never reads its
//! response (flow-control window 0) or never finishes its request body holds an upstream
//! stream, and a backend allows only so many. hyper stops polling a response body while the
//! client grants no window, so no timer inside the body would ever fire; instead one task
//! per client connection looks at its streams every half `streamIdleTimeout` and, for one
//! that moved no data in a whole period, drops the upstream response (resetting the upstream
//! stream) and fails the request body (so the upstream request is reset too).

use crate::body::{Body, BodyError};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

/// One stream's progress, shared by its request body, its response body and the sweeper.
pub struct StreamWatch {
    moved: AtomicU64,
    expired: AtomicBool,
    /// The request body's reader, woken on expiry.
    waker: AtomicWaker,
    /// The upstream response, once it arrived; taken and dropped on expiry.
    response: Mutex<Option<Body>>,
}

impl StreamWatch {
    fn expire(&self) {
        self.expired.store(true, Ordering::Relaxed);
        self.waker.wake();
        let response = self.lock().take();
        drop(response);
    }

    fn moved(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Body>> {
        self.response.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps a request body: its frames count as progress, and it fails once the stream
    /// has expired.
    pub fn request(self: &Arc<Self>, body: Body) -> Body {
        Watched {
            watch: self.clone(),
            request: Some(Box::new(body)),
        }
        .into()
    }

    /// Wraps a response body the same way; on expiry the body itself is dropped.
    pub fn response(self: &Arc<Self>, body: Body) -> Body {
        *self.lock() = Some(body);
        Watched {
            watch: self.clone(),
            request: None,
        }
        .into()
    }
}

/// The streams of one client connection.
#[derive(Default)]
pub struct Streams {
    list: Mutex<Vec<Entry>>,
    sweeping: AtomicBool,
}

/// Finished streams are forgotten when the list reaches twice what was live at the last
/// such pass (and at least this many): a long-lived connection (a peer sidecar's, carrying
/// thousands of streams a second) must not keep every stream it carried until the next
/// sweep, which may be minutes away.
const COMPACT_AT_LEAST: usize = 64;

struct Entry {
    watch: Weak<StreamWatch>,
    last: u64,
    still: u8,
}

impl Streams {
    /// Starts watching a new stream; the first one starts the connection's sweeper, which
    /// checks every half `idle` and ends with the connection.
    pub fn watch(self: &Arc<Self>, idle: Duration, expired: &Counter) -> Arc<StreamWatch> {
        let w = Arc::new(StreamWatch {
            moved: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            response: Mutex::new(None),
        });
        {
            let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            if list.len() >= COMPACT_AT_LEAST && list.len() == list.capacity() {
                // Amortised: a pass only when the vector would grow, which after a pass
                // that freed little is at twice the live streams.
                list.retain(|e| e.watch.strong_count() > 0);
            }
            list.push(Entry {
                watch: Arc::downgrade(&w),
                last: 0,
                still: 0,
            });
        }
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), idle, expired.clone()));
        }
        w
    }

    /// One look at every stream: forgets finished ones, expires those still for two looks.
    /// Returns how many expired.
    fn check(&self) -> usize {
        let mut gone = Vec::new();
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain_mut(|e| {
                let Some(w) = e.watch.upgrade() else {
                    return false;
                };
                let now = w.moved.load(Ordering::Relaxed);
                if now != e.last {
                    (e.last, e.still) = (now, 0);
                    return true;
                }
                e.still += 1;
                if e.still < 2 {
                    return true;
                }
                gone.push(w);
                false
            });
        // Outside the lock: dropping a response resets its upstream stream.
        for w in &gone {
            w.expire();
        }
        gone.len()
    }
}

async fn sweep(streams: Weak<Streams>, idle: Duration, expired: Counter) {
    loop {
        tokio::time::sleep(idle / 2).await;
        let Some(s) = streams.upgrade() else {
            return;
        };
        let n = s.check();
        if n > 0 {
            tracing::debug!(streams = n, "streams without progress reset");
            expired.inc_by(n as u64);
        }
    }
}

/// A request or response body under a [`StreamWatch`].
pub struct Watched {
    watch: Arc<StreamWatch>,
    /// The request body; `None` for a response, whose body lives in the watch.
    request: Option<Box<Body>>,
}

fn idle_error() -> BodyError {
    "stream made no progress for the stream idle timeout".into()
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let res = match &mut this.request {
            Some(body) => {
                this.watch.waker.register(cx.waker());
                if this.watch.expired.load(Ordering::Relaxed) {
                    return Poll::Ready(Some(Err(idle_error())));
                }
                Pin::new(&mut **body).poll_frame(cx)
            }
            None => match this.watch.lock().as_mut() {
                Some(body) => Pin::new(body).poll_frame(cx),
                None => return Poll::Ready(Some(Err(idle_error()))),
            },
        };
        if let Poll::Ready(Some(Ok(_))) = res {
            this.watch.moved();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.request {
            Some(body) => http_body::Body::is_end_stream(&**body),
            // Expired: not ended, so that the writer polls and sees the error.
            None => self
                .watch
                .lock()
                .as_ref()
                .is_some_and(http_body::Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.request {
            Some(body) => http_body::Body::size_hint(&**body),
            None => self
                .watch
                .lock()
                .as_ref()
                .map(http_body::Body::size_hint)
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A stream that keeps moving survives; one that stops is expired after two looks: its
    /// response is dropped and its request body fails.
    #[tokio::test]
    async fn still_streams_expire_after_two_looks() {
        let streams = Arc::new(Streams::default());
        // A long idle time: the sweeper never runs; the test looks itself.
        let idle = Duration::from_secs(3600);
        let counter = Counter::default();
        let busy = streams.watch(idle, &counter);
        let still = streams.watch(idle, &counter);
        let mut busy_req = busy.request(crate::body::full("a"));
        let mut still_req = still.request(crate::body::full("b"));
        let mut still_resp = still.response(crate::body::full("c"));
        assert_eq!(streams.check(), 0, "first look: nothing still yet");
        // The busy stream moves between looks; the still one does not.
        busy_req.frame().await.unwrap().unwrap();
        assert_eq!(streams.check(), 1, "second look: the still stream expires");
        assert!(still.lock().is_none(), "its response was dropped");
        assert!(still_req.frame().await.unwrap().is_err());
        assert!(still_resp.frame().await.unwrap().is_err());
        assert!(!http_body::Body::is_end_stream(&still_resp));
        assert_eq!(streams.check(), 0, "the busy stream moved at its last look");
        assert_eq!(streams.check(), 1, "and now it is still for two");
        // Finished streams are forgotten.
        drop((busy, busy_req, still, still_req, still_resp));
        assert_eq!(streams.list.lock().unwrap().len(), 0);
    }

    /// A connection that carries many streams one after another (a peer sidecar's HTTP/2
    /// connection) keeps only about as many entries as it has live streams, without a sweep.
    #[tokio::test]
    async fn finished_streams_do_not_pile_up_between_sweeps() {
        let streams = Arc::new(Streams::default());
        let idle = Duration::from_secs(3600);
        let counter = Counter::default();
        let live: Vec<_> = (0..10).map(|_| streams.watch(idle, &counter)).collect();
        for _ in 0..100_000 {
            drop(streams.watch(idle, &counter));
        }
        let len = streams.list.lock().unwrap().len();
        assert!(
            len <= 2 * COMPACT_AT_LEAST,
            "{len} entries for 10 live streams"
        );
        assert_eq!(live.len(), 10);
    }
}
