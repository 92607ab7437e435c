//! order-processing: places an order by calling product-catalog, inventory and payment in
//! turn, so one request exercises three hops of the mesh. Its errors name the dependency that
//! failed, which is what someone watching the demo wants to see.

use crate::catalog::VERSION_HEADER;
use crate::web::{self, Body, CallError, HttpClient, Reject, Reply, Req};
use crate::{App, Config, DemoError};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpStream;

/// Every call to a dependency gets this long, so a stuck dependency shows as a 504.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Orders kept for `GET /orders/{id}`.
const KEEP_ORDERS: usize = 1000;

/// How order-processing reaches one dependency.
enum Route {
    /// A base URL, normally the local sidecar's port for that dependency.
    Direct(String),
    /// `host:port` of an HTTP proxy (the sidecar) that routes absolute-URI requests by Host.
    Proxy(String),
}

struct Upstream {
    app: App,
    route: Route,
}

impl Upstream {
    /// An explicit URL wins over the proxy.
    fn new(
        app: App,
        url: &Option<String>,
        var: &'static str,
        config: &Config,
    ) -> Result<Self, DemoError> {
        let route = match (url, &config.http_proxy) {
            (Some(url), _) => Route::Direct(url.clone()),
            (None, Some(proxy)) => Route::Proxy(proxy.clone()),
            (None, None) => {
                return Err(DemoError::Missing {
                    app: App::Orders.name(),
                    var,
                });
            }
        };
        Ok(Upstream { app, route })
    }
}

#[derive(Deserialize)]
struct NewOrder {
    product_id: u32,
    quantity: u32,
}

/// Recent orders, oldest first in `order`.
#[derive(Default)]
struct Recent {
    by_id: HashMap<u64, Value>,
    order: VecDeque<u64>,
}

pub(crate) struct Orders {
    client: HttpClient,
    catalog: Upstream,
    inventory: Upstream,
    payment: Upstream,
    next_id: AtomicU64,
    recent: Mutex<Recent>,
}

impl Orders {
    pub(crate) fn new(config: &Config) -> Result<Orders, DemoError> {
        Ok(Orders {
            client: web::client(),
            catalog: Upstream::new(
                App::Catalog,
                &config.catalog_url,
                "CATALOG_URL or HTTP_PROXY",
                config,
            )?,
            inventory: Upstream::new(
                App::Inventory,
                &config.inventory_url,
                "INVENTORY_URL or HTTP_PROXY",
                config,
            )?,
            payment: Upstream::new(
                App::Payment,
                &config.payment_url,
                "PAYMENT_URL or HTTP_PROXY",
                config,
            )?,
            next_id: AtomicU64::new(1),
            recent: Mutex::default(),
        })
    }

    pub(crate) async fn handle(&self, req: &Req) -> Response<Body> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/healthz") => web::healthy(),
            (&Method::POST, "/orders") => match self.place(req).await {
                Ok(order) => web::json(StatusCode::CREATED, &order),
                Err(reject) => reject.into(),
            },
            (&Method::GET, path) => match web::id_after(path, "/orders/") {
                Some(id) => match self.recent().by_id.get(&id) {
                    Some(order) => web::json(StatusCode::OK, order),
                    None => web::error(StatusCode::NOT_FOUND, "no such order"),
                },
                None => web::not_found(),
            },
            _ => web::not_found(),
        }
    }

    /// An order's whole path. Payment failures do not release the reservation: the demo's
    /// inventory restocks on its own.
    async fn place(&self, req: &Req) -> Result<Value, Reject> {
        let NewOrder {
            product_id,
            quantity,
        } = web::parse_json(&req.body)?;
        let trace = &req.trace;
        if quantity == 0 {
            let msg = "quantity must be at least 1".to_owned();
            return Err(Reject(StatusCode::BAD_REQUEST, msg));
        }

        // 1. Price and version from the catalog; its 404 is the caller's 404.
        let path = format!("/products/{product_id}");
        let reply = self
            .call(&self.catalog, Method::GET, &path, None, trace)
            .await?;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                let msg = format!("unknown product {product_id}");
                return Err(Reject(StatusCode::NOT_FOUND, msg));
            }
            _ => return Err(failed(&self.catalog, &reply)),
        }
        let catalog_version = reply
            .headers
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_owned();
        let mut product = reply.json().unwrap_or_default();
        let Some(price) = product.get("price_cents").and_then(Value::as_u64) else {
            return Err(failed(&self.catalog, &reply));
        };
        if let Some(fields) = product.as_object_mut() {
            fields.remove("version");
        }
        let total_cents = price.saturating_mul(u64::from(quantity));

        // 2. Reserve stock.
        let reserve = json!({ "id": product_id, "quantity": quantity });
        let reply = self
            .call(
                &self.inventory,
                Method::POST,
                "/reserve",
                Some(reserve),
                trace,
            )
            .await?;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::CONFLICT => {
                let msg = format!("inventory: product {product_id} is out of stock");
                return Err(Reject(StatusCode::CONFLICT, msg));
            }
            _ => return Err(failed(&self.inventory, &reply)),
        }

        // 3. Charge; a decline is the payment dependency failing the order.
        let order_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let charge = json!({ "order_id": order_id, "amount_cents": total_cents });
        let reply = self
            .call(&self.payment, Method::POST, "/charge", Some(charge), trace)
            .await?;
        let (StatusCode::OK, Some(charge)) = (reply.status, reply.json()) else {
            return Err(failed(&self.payment, &reply));
        };

        // 4. Remember it for `GET /orders/{id}`.
        let order = json!({
            "order_id": order_id,
            "product": product,
            "quantity": quantity,
            "total_cents": total_cents,
            "catalog_version": catalog_version,
            "charge": charge,
        });
        self.remember(order_id, order.clone());
        Ok(order)
    }

    /// Calls a dependency; no answer becomes 502 (or 504 on timeout) naming it.
    async fn call(
        &self,
        up: &Upstream,
        method: Method,
        path: &str,
        body: Option<Value>,
        trace: &http::HeaderMap,
    ) -> Result<Reply, Reject> {
        let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
        let mut req = Request::builder()
            .method(method)
            .header(CONTENT_TYPE, "application/json");
        if let Some(h) = req.headers_mut() {
            h.extend(trace.clone());
        }
        req = match &up.route {
            Route::Direct(base) => req.uri(format!("{base}{path}")),
            // The proxy picks the dependency by Host, so name it in both places.
            Route::Proxy(_) => {
                let host = up.app.name();
                req.uri(format!("http://{host}{path}")).header(HOST, host)
            }
        };
        let result = match (req.body(Full::new(body)), &up.route) {
            (Err(e), _) => Err(e.into()),
            (Ok(req), Route::Direct(_)) => web::send(&self.client, req, CALL_TIMEOUT).await,
            (Ok(req), Route::Proxy(proxy)) => via_proxy(proxy, req).await,
        };
        result.map_err(|e| {
            let status = match e {
                CallError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            Reject(status, format!("{}: {e}", up.app.name()))
        })
    }

    fn remember(&self, id: u64, order: Value) {
        let mut recent = self.recent();
        recent.by_id.insert(id, order);
        recent.order.push_back(id);
        while recent.order.len() > KEEP_ORDERS {
            if let Some(old) = recent.order.pop_front() {
                recent.by_id.remove(&old);
            }
        }
    }

    /// The map stays consistent even if a holder panicked, so poisoning is ignored.
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends an absolute-URI request over a fresh connection to the proxy. The pooled client
/// cannot do this: it rewrites URIs to origin form unless its connector says "proxy".
async fn via_proxy(proxy: &str, req: Request<Body>) -> Result<Reply, CallError> {
    let call = async {
        let stream = TcpStream::connect(proxy).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Reply::read(sender.send_request(req).await?).await
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| CallError::Timeout)?
}

/// A 502 naming the dependency and what it said, e.g. `payment: 402 declined`.
fn failed(up: &Upstream, reply: &Reply) -> Reject {
    let said = reply.json().and_then(|body| {
        let field = body.get("error").or_else(|| body.get("status"))?;
        field.as_str().map(str::to_owned)
    });
    let said = said.unwrap_or_else(|| {
        reply
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_owned()
    });
    let msg = format!("{}: {} {said}", up.app.name(), reply.status.as_u16());
    Reject(StatusCode::BAD_GATEWAY, msg)
}
