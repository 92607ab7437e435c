//! product-catalog: a fixed list of products. Every answer names the running version, and
//! versions after v1 add ratings, so a canary shows up in what callers see.

use crate::web::{self, Body, Req};
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::{Value, json};

/// The header that carries the catalog's version, which order-processing passes on.
pub const VERSION_HEADER: &str = "x-demo-version";

struct Product {
    id: u32,
    name: &'static str,
    price_cents: u64,
    rating: f64,
}

const PRODUCTS: [Product; 5] = [
    product(1, "Espresso Machine", 24900, 4.6),
    product(2, "Coffee Grinder", 8900, 4.2),
    product(3, "Milk Frother", 3900, 3.9),
    product(4, "Pour-over Kettle", 5400, 4.8),
    product(5, "Bean Sampler", 1900, 4.4),
];

const fn product(id: u32, name: &'static str, price_cents: u64, rating: f64) -> Product {
    Product {
        id,
        name,
        price_cents,
        rating,
    }
}

/// The ids the catalog knows, which inventory stocks and the load generator orders.
pub(crate) fn product_ids() -> impl Iterator<Item = u32> {
    PRODUCTS.iter().map(|p| p.id)
}

pub(crate) struct Catalog {
    version: HeaderValue,
    ratings: bool,
}

impl Catalog {
    pub(crate) fn new(version: HeaderValue) -> Catalog {
        let ratings = version != "v1";
        Catalog { version, ratings }
    }

    pub(crate) fn handle(&self, req: &Req) -> Response<Body> {
        let version = self.version.to_str().unwrap_or_default();
        let mut resp = match (&req.method, req.path.as_str()) {
            (&Method::GET, "/healthz") => web::healthy(),
            (&Method::GET, "/products") => {
                let products: Vec<Value> = PRODUCTS.iter().map(|p| self.describe(p)).collect();
                web::json(
                    StatusCode::OK,
                    &json!({ "version": version, "products": products }),
                )
            }
            (&Method::GET, path) => match web::id_after(path, "/products/")
                .and_then(|id: u32| PRODUCTS.iter().find(|p| p.id == id))
            {
                Some(p) => {
                    let mut body = self.describe(p);
                    body["version"] = json!(version);
                    web::json(StatusCode::OK, &body)
                }
                None => web::error(StatusCode::NOT_FOUND, "no such product"),
            },
            _ => web::not_found(),
        };
        resp.headers_mut()
            .insert(VERSION_HEADER, self.version.clone());
        resp
    }

    fn describe(&self, p: &Product) -> Value {
        let mut body = json!({ "id": p.id, "name": p.name, "price_cents": p.price_cents });
        if self.ratings {
            body["rating"] = json!(p.rating);
        }
        body
    }
}
