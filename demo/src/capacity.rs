//! A fixed-capacity server for the overload benchmark: `capacity` requests are served at
//! once, each taking `service` time; the rest wait their turn in arrival order, as in a
//! thread pool with an unbounded queue. Past its capacity its latency grows with the queue.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    capacity: usize,
    service: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let workers = Arc::new(Semaphore::new(capacity.max(1)));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let workers = workers.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let workers = workers.clone();
                async move {
                    // Fair: waiters get a worker in arrival order.
                    let _worker = workers.acquire().await;
                    tokio::time::sleep(service).await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twice the capacity at once: the second half waits one service time.
    #[tokio::test]
    async fn requests_beyond_capacity_wait_their_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, 2, Duration::from_millis(100), async {
            let _ = stopped.await;
        }));
        let client = crate::web::client();
        let start = tokio::time::Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let client = client.clone();
            calls.spawn(async move {
                let req = http::Request::get(format!("http://{addr}/"))
                    .body(Full::default())
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                start.elapsed()
            });
        }
        let mut took: Vec<Duration> = calls.join_all().await;
        took.sort();
        assert!(took[1] < Duration::from_millis(190), "{took:?}");
        assert!(took[2] >= Duration::from_millis(200), "{took:?}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
