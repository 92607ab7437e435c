//! The one body type the proxy moves around, and small constructors.
//!
//! An enum rather than a boxed trait object: every proxied request and response carries a
//! body, and boxing one is an allocation per message (two per exchange) for no gain, since
//! the kinds of body the proxy handles are few and known.

use crate::http::Tracked;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request or response body: streamed from a peer, or produced by the proxy.
pub struct Body(Kind);

// `Tracked` is the body of every proxied response: boxing it would be an allocation per
// exchange to save bytes that the enum's other kinds, less common, would leave unused.
#[expect(clippy::large_enum_variant, reason = "Tracked is the common case")]
enum Kind {
    Empty,
    /// Bytes produced by the proxy; `None` once sent.
    Full(Option<Bytes>),
    /// Streamed from a peer.
    Incoming(Incoming),
    /// A request body streamed from the client, its bytes counted for metrics.
    Counted(Incoming, crate::golden::RequestMeter),
    /// An upstream response that releases its endpoint and connection when it ends.
    Tracked(Tracked),
    /// A body under a stream idle timeout.
    Watched(crate::streams::Watched),
    /// A request body recorded for retries.
    Replayed(crate::replay::Replayed),
    /// A request body handing copies of its frames to mirrors.
    Tee(crate::mirror::Tee),
    /// A mirrored copy's body.
    Copy(crate::mirror::CopyBody),
    /// A response body whose end ends the request's span and log line.
    Observed(Box<crate::hop::Observed>),
    /// Any stream, in unit tests.
    #[cfg(test)]
    Test(http_body_util::combinators::BoxBody<Bytes, BodyError>),
}

/// A body with these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    let bytes = bytes.into();
    Body(if bytes.is_empty() {
        Kind::Empty
    } else {
        Kind::Full(Some(bytes))
    })
}

/// An empty body.
pub fn empty() -> Body {
    Body(Kind::Empty)
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Body {
        Body(Kind::Incoming(b))
    }
}

impl From<Tracked> for Body {
    fn from(b: Tracked) -> Body {
        Body(Kind::Tracked(b))
    }
}

impl From<crate::streams::Watched> for Body {
    fn from(b: crate::streams::Watched) -> Body {
        Body(Kind::Watched(b))
    }
}

impl From<crate::replay::Replayed> for Body {
    fn from(b: crate::replay::Replayed) -> Body {
        Body(Kind::Replayed(b))
    }
}

impl From<crate::mirror::Tee> for Body {
    fn from(b: crate::mirror::Tee) -> Body {
        Body(Kind::Tee(b))
    }
}

impl From<crate::mirror::CopyBody> for Body {
    fn from(b: crate::mirror::CopyBody) -> Body {
        Body(Kind::Copy(b))
    }
}

impl From<Box<crate::hop::Observed>> for Body {
    fn from(b: Box<crate::hop::Observed>) -> Body {
        Body(Kind::Observed(b))
    }
}

/// A body streaming `s`, for unit tests.
#[cfg(test)]
pub(crate) fn test_stream<S, E>(s: S) -> Body
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, E>> + Send + Sync + 'static,
    E: Into<BodyError> + 'static,
{
    use http_body_util::BodyExt;
    Body(Kind::Test(
        http_body_util::StreamBody::new(s)
            .map_err(Into::into)
            .boxed(),
    ))
}

impl Body {
    /// A client's request body whose bytes `meter` counts.
    pub(crate) fn counted(b: Incoming, meter: crate::golden::RequestMeter) -> Body {
        Body(Kind::Counted(b, meter))
    }

    /// Hands a streamed upstream response's meter to its body. Returns it back when the body
    /// is of another kind.
    pub(crate) fn meter(
        &mut self,
        m: crate::golden::ResponseMeter,
    ) -> Result<(), crate::golden::ResponseMeter> {
        match &mut self.0 {
            Kind::Tracked(t) => {
                t.meter(m);
                Ok(())
            }
            _ => Err(m),
        }
    }

    /// Keeps `busy` (the client connection's activity guard) alive until this body ends or is
    /// dropped, when it streams from an upstream: a response that is still streaming keeps
    /// its client connection from counting as idle, however long it pauses.
    pub(crate) fn hold(&mut self, busy: crate::io::Busy) {
        if let Kind::Tracked(t) = &mut self.0 {
            t.hold(busy);
        }
    }

    /// Keeps an OverloadPolicy's concurrency slot until a streamed upstream response ends;
    /// any other body is whole already, and the slot goes with the request.
    pub(crate) fn hold_slot(&mut self, slot: crate::overload::Slot) {
        if let Kind::Tracked(t) = &mut self.0 {
            t.hold_slot(slot);
        }
    }
}

/// Why a body stopped: hyper's error for a body hyper reads, the lean client's for the rest.
/// Boxed, as hyper wants it; built only when something fails.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Every variant is `Unpin`, so no projection is needed.
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
            Kind::Counted(b, m) => {
                let r = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &r {
                    m.frame(f);
                }
                r.map(|f| f.map(|f| f.map_err(Into::into)))
            }
            Kind::Tracked(b) => Pin::new(b).poll_frame(cx),
            Kind::Watched(b) => Pin::new(b).poll_frame(cx),
            Kind::Replayed(b) => Pin::new(b).poll_frame(cx),
            Kind::Tee(b) => Pin::new(b).poll_frame(cx),
            Kind::Copy(b) => Pin::new(b).poll_frame(cx),
            Kind::Observed(b) => Pin::new(&mut **b).poll_frame(cx),
            #[cfg(test)]
            Kind::Test(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(b) | Kind::Counted(b, _) => b.is_end_stream(),
            Kind::Tracked(b) => b.is_end_stream(),
            Kind::Watched(b) => b.is_end_stream(),
            Kind::Replayed(b) => b.is_end_stream(),
            Kind::Tee(b) => b.is_end_stream(),
            Kind::Copy(b) => b.is_end_stream(),
            Kind::Observed(b) => b.is_end_stream(),
            #[cfg(test)]
            Kind::Test(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(b) | Kind::Counted(b, _) => b.size_hint(),
            Kind::Tracked(b) => b.size_hint(),
            Kind::Watched(b) => b.size_hint(),
            Kind::Replayed(b) => b.size_hint(),
            Kind::Tee(b) => b.size_hint(),
            Kind::Copy(b) => b.size_hint(),
            Kind::Observed(b) => b.size_hint(),
            #[cfg(test)]
            Kind::Test(b) => b.size_hint(),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Kind::Empty => "empty",
            Kind::Full(_) => "full",
            Kind::Incoming(_) | Kind::Counted(..) => "incoming",
            Kind::Tracked(_) => "tracked",
            Kind::Watched(_) => "watched",
            Kind::Replayed(_) => "replayed",
            Kind::Tee(_) => "tee",
            Kind::Copy(_) => "mirror copy",
            Kind::Observed(_) => "observed",
            #[cfg(test)]
            Kind::Test(_) => "test",
        };
        write!(f, "Body({kind})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_and_empty_bodies() {
        let b = full("hello");
        assert_eq!(http_body::Body::size_hint(&b).exact(), Some(5));
        assert!(!http_body::Body::is_end_stream(&b));
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");

        let e = empty();
        assert!(http_body::Body::is_end_stream(&e));
        assert_eq!(http_body::Body::size_hint(&e).exact(), Some(0));
        assert!(e.collect().await.unwrap().to_bytes().is_empty());
        // An empty `full` is the empty body: nothing to frame.
        assert!(http_body::Body::is_end_stream(&full("")));
    }
}
