//! The demo apps run for real on loopback ports and are driven with a real HTTP client.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_demo::{App, Config, DemoError, VERSION_HEADER, generate, run, serve};

/// Fails a test that hangs instead of letting it run forever.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test took too long")
}

fn config(vars: &[(&str, &str)]) -> Config {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .expect("valid config")
}

/// A demo app serving on a random loopback port.
struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), DemoError>>,
}

async fn start(app: App, vars: &[(&str, &str)]) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let shutdown = async {
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve(app, config(vars), listener, shutdown));
    Running { url, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().expect("clean shutdown");
    }
}

/// Catalog, inventory and payment, and order-processing calling them directly. Each app
/// stops when its `Running` is dropped.
struct Stack {
    catalog: Running,
    _inventory: Running,
    _payment: Running,
    orders: Running,
}

async fn stack(version: &str, failure_rate: &str) -> Stack {
    let catalog = start(App::Catalog, &[("DEMO_VERSION", version)]).await;
    let inventory = start(App::Inventory, &[]).await;
    let payment = start(App::Payment, &[("PAYMENT_FAILURE_RATE", failure_rate)]).await;
    let vars = [
        ("CATALOG_URL", catalog.url.as_str()),
        ("INVENTORY_URL", inventory.url.as_str()),
        ("PAYMENT_URL", payment.url.as_str()),
    ];
    let orders = start(App::Orders, &vars).await;
    Stack {
        catalog,
        _inventory: inventory,
        _payment: payment,
        orders,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn call(method: Method, url: &str, body: Option<Value>) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(url: &str) -> Answer {
    call(Method::GET, url, None).await
}

async fn post(url: &str, body: Value) -> Answer {
    call(Method::POST, url, Some(body)).await
}

#[tokio::test]
async fn catalog_versions_are_visible() {
    bounded(async {
        for version in ["v1", "v2"] {
            let catalog = start(App::Catalog, &[("DEMO_VERSION", version)]).await;
            let health = get(&format!("{}/healthz", catalog.url)).await;
            assert_eq!(
                (health.status, &health.body[..]),
                (StatusCode::OK, &b"ok"[..])
            );

            let list = get(&format!("{}/products", catalog.url)).await;
            assert_eq!(list.status, StatusCode::OK);
            assert_eq!(list.headers[VERSION_HEADER], version);
            let body = list.json();
            assert_eq!(body["version"], version);
            let products = body["products"].as_array().unwrap();
            assert_eq!(products.len(), 5);
            let rated = products.iter().all(|p| p["rating"].is_number());
            assert_eq!(rated, version == "v2", "{products:?}");

            let one = get(&format!("{}/products/2", catalog.url)).await;
            assert_eq!(one.status, StatusCode::OK);
            assert_eq!(one.headers[VERSION_HEADER], version);
            let one = one.json();
            assert_eq!(
                (one["id"].as_u64(), &one["version"]),
                (Some(2), &json!(version))
            );
            assert!(one["price_cents"].is_u64());

            let missing = get(&format!("{}/products/99", catalog.url)).await;
            assert_eq!(missing.status, StatusCode::NOT_FOUND);
            assert_eq!(missing.headers[VERSION_HEADER], version);
            catalog.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn orders_go_through_catalog_inventory_and_payment() {
    bounded(async {
        let stack = stack("v2", "0").await;
        let product = get(&format!("{}/products/4", stack.catalog.url))
            .await
            .json();
        let price = product["price_cents"].as_u64().unwrap();

        let placed = post(
            &format!("{}/orders", stack.orders.url),
            json!({ "product_id": 4, "quantity": 3 }),
        )
        .await;
        assert_eq!(placed.status, StatusCode::CREATED, "{:?}", placed.body);
        let order = placed.json();
        assert_eq!(order["total_cents"].as_u64(), Some(price * 3));
        assert_eq!(order["quantity"], 3);
        assert_eq!(order["catalog_version"], "v2");
        assert_eq!(order["product"]["id"], 4);
        assert!(order["product"]["rating"].is_number());
        assert_eq!(order["charge"]["status"], "captured");

        let id = order["order_id"].as_u64().unwrap();
        let read = get(&format!("{}/orders/{id}", stack.orders.url)).await;
        assert_eq!((read.status, read.json()), (StatusCode::OK, order));
        let missing = get(&format!("{}/orders/999999", stack.orders.url)).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        stack.orders.stop().await;
    })
    .await;
}

#[tokio::test]
async fn order_failures_name_the_dependency() {
    bounded(async {
        let stack = stack("v1", "1.0").await;
        let orders = format!("{}/orders", stack.orders.url);

        let unknown = post(&orders, json!({ "product_id": 42, "quantity": 1 })).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.json()["error"], "unknown product 42");

        // More than inventory ever holds.
        let too_many = post(&orders, json!({ "product_id": 1, "quantity": 5000 })).await;
        assert_eq!(too_many.status, StatusCode::CONFLICT);
        let error = too_many.json()["error"].as_str().unwrap().to_owned();
        assert!(error.starts_with("inventory:"), "{error}");

        let declined = post(&orders, json!({ "product_id": 1, "quantity": 1 })).await;
        assert_eq!(declined.status, StatusCode::BAD_GATEWAY);
        assert_eq!(declined.json()["error"], "payment: 402 declined");

        let garbage = call(Method::POST, &orders, None).await;
        assert_eq!(garbage.status, StatusCode::BAD_REQUEST);

        // A dependency that is gone is a 502 naming it.
        stack.catalog.stop().await;
        let down = post(&orders, json!({ "product_id": 1, "quantity": 1 })).await;
        assert_eq!(down.status, StatusCode::BAD_GATEWAY);
        let error = down.json()["error"].as_str().unwrap().to_owned();
        assert!(error.starts_with("product-catalog:"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn inventory_refuses_then_restocks() {
    bounded(async {
        let inventory = start(App::Inventory, &[]).await;
        let reserve = format!("{}/reserve", inventory.url);
        let all = post(&reserve, json!({ "id": 3, "quantity": 1000 })).await;
        assert_eq!(all.json()["remaining"], 0);
        let stock = get(&format!("{}/stock/3", inventory.url)).await.json();
        assert_eq!(stock, json!({ "id": 3, "available": 0 }));

        let refused = post(&reserve, json!({ "id": 3, "quantity": 1 })).await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        let again = post(&reserve, json!({ "id": 3, "quantity": 1 })).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.json()["remaining"], 999);
        inventory.stop().await;
    })
    .await;
}

/// A stand-in sidecar in HTTP proxy mode: records each request's URI and Host and answers
/// as the service named by the Host.
async fn fake_proxy() -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    let (addr, seen, _) = fake_proxy_traced().await;
    (addr, seen)
}

/// Trace-context headers each request carried, as `name: value` lines.
type Contexts = Arc<Mutex<Vec<Vec<String>>>>;

/// [`fake_proxy`], also recording each request's trace-context headers.
async fn fake_proxy_traced() -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>, Contexts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let contexts: Contexts = Arc::default();
    let (log, ctx) = (seen.clone(), contexts.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (log, ctx) = (log.clone(), ctx.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                let host = req.headers()["host"].to_str().unwrap().to_owned();
                log.lock()
                    .unwrap()
                    .push((req.uri().to_string(), host.clone()));
                let mut trace: Vec<String> = req
                    .headers()
                    .iter()
                    .filter(|(n, _)| {
                        let n = n.as_str();
                        n == "traceparent"
                            || n == "tracestate"
                            || n == "b3"
                            || n.starts_with("x-b3-")
                    })
                    .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                    .collect();
                trace.sort();
                ctx.lock().unwrap().push(trace);
                let body = match host.as_str() {
                    "product-catalog" => json!({ "id": 1, "name": "x", "price_cents": 250 }),
                    "inventory" => json!({ "id": 1, "reserved": 1, "remaining": 9 }),
                    _ => json!({ "charge_id": "ch_1", "status": "captured" }),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                resp.headers_mut()
                    .insert(VERSION_HEADER, "proxied".parse().unwrap());
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, seen, contexts)
}

#[tokio::test]
async fn orders_pass_the_trace_context_on_to_every_dependency() {
    bounded(async {
        let (proxy, _, contexts) = fake_proxy_traced().await;
        let proxy = format!("http://{proxy}");
        let orders = start(App::Orders, &[("HTTP_PROXY", &proxy)]).await;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let req = Request::post(format!("{}/orders", orders.url))
            .header("traceparent", tp)
            .header("tracestate", "v=1")
            .header("x-b3-sampled", "1")
            .body(Full::new(Bytes::from(
                json!({ "product_id": 1, "quantity": 1 }).to_string(),
            )))
            .unwrap();
        let stream = tokio::net::TcpStream::connect(orders.url.trim_start_matches("http://"))
            .await
            .unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let want = vec![
            format!("traceparent: {tp}"),
            "tracestate: v=1".to_string(),
            "x-b3-sampled: 1".to_string(),
        ];
        assert_eq!(*contexts.lock().unwrap(), vec![want; 3]);
        orders.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http_proxy_mode_sends_absolute_uris_routed_by_host() {
    bounded(async {
        let (proxy, seen) = fake_proxy().await;
        let proxy = format!("http://{proxy}");
        let orders = start(App::Orders, &[("HTTP_PROXY", &proxy)]).await;
        let placed = post(
            &format!("{}/orders", orders.url),
            json!({ "product_id": 1, "quantity": 2 }),
        )
        .await;
        assert_eq!(placed.status, StatusCode::CREATED, "{:?}", placed.body);
        assert_eq!(placed.json()["total_cents"], 500);
        assert_eq!(placed.json()["catalog_version"], "proxied");
        let expected = [
            ("http://product-catalog/products/1", "product-catalog"),
            ("http://inventory/reserve", "inventory"),
            ("http://payment/charge", "payment"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(u, h)| (u.to_string(), h.to_string()))
            .collect();
        assert_eq!(*seen.lock().unwrap(), expected);
        orders.stop().await;

        // An explicit URL wins over the proxy.
        seen.lock().unwrap().clear();
        let catalog = start(App::Catalog, &[]).await;
        let vars = [
            ("HTTP_PROXY", proxy.as_str()),
            ("CATALOG_URL", &catalog.url),
        ];
        let orders = start(App::Orders, &vars).await;
        let placed = post(
            &format!("{}/orders", orders.url),
            json!({ "product_id": 1, "quantity": 1 }),
        )
        .await;
        assert_eq!(placed.json()["catalog_version"], "v1");
        let hosts: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        assert_eq!(hosts, ["inventory", "payment"]);
        orders.stop().await;
    })
    .await;
}

#[tokio::test]
async fn order_processing_needs_a_way_to_its_dependencies() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = serve(App::Orders, config(&[]), listener, async {}).await;
    assert!(
        matches!(result, Err(DemoError::Missing { var, .. }) if var.starts_with("CATALOG_URL")),
        "{result:?}"
    );
}

#[tokio::test]
async fn load_generator_keeps_its_rate_and_stops_on_shutdown() {
    bounded(async {
        let stack = stack("v1", "0").await;
        let load = config(&[("TARGET_URL", &stack.orders.url), ("RATE", "50")]);
        let summary = generate(&load, tokio::time::sleep(Duration::from_secs(2)))
            .await
            .unwrap();
        // 2 seconds at 50/s is 100 requests, plus the first tick at time zero.
        assert!((70..=101).contains(&summary.requests), "{summary:?}");
        assert_eq!(summary.skipped, 0);
        let created = summary.by_status.get("201").copied().unwrap_or(0);
        let read_back = summary.by_status.get("200").copied().unwrap_or(0);
        assert_eq!(created + read_back, summary.requests, "{summary:?}");
        assert!(read_back > 0, "{summary:?}");
        assert_eq!(summary.by_version.get("v1"), Some(&summary.requests));
        stack.orders.stop().await;
    })
    .await;
}

#[tokio::test]
async fn run_listens_on_port_and_checks_what_each_app_needs() {
    bounded(async {
        // Learn a free port, then let `run` bind it.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let port_var = port.to_string();
        let task = tokio::spawn(run(App::Payment, config(&[("PORT", &port_var)]), shutdown));
        let url = format!("http://127.0.0.1:{port}/healthz");
        let mut health = None;
        for _ in 0..50 {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(_) => {
                    health = Some(get(&url).await.status);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert_eq!(health, Some(StatusCode::OK));
        let _ = stop.send(());
        task.await.unwrap().unwrap();

        let no_port = run(App::Catalog, config(&[]), async {}).await;
        assert!(matches!(
            no_port,
            Err(DemoError::Missing { var: "PORT", .. })
        ));
        let no_target = run(App::Load, config(&[]), async {}).await;
        assert!(matches!(
            no_target,
            Err(DemoError::Missing {
                var: "TARGET_URL",
                ..
            })
        ));
    })
    .await;
}
