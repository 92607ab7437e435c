//! inventory: stock per product, kept in memory. A reservation larger than what is left is
//! refused with 409 and triggers a restock, so a steady load sees an occasional 409 instead
//! of running dry for good.

use crate::catalog;
use crate::web::{self, Body, Req};
use http::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Both the opening stock and what a restock fills up to.
const RESTOCK_TO: u32 = 1000;

#[derive(Deserialize)]
struct Reserve {
    id: u32,
    quantity: u32,
}

pub(crate) struct Inventory {
    stock: Mutex<HashMap<u32, u32>>,
}

impl Inventory {
    pub(crate) fn new() -> Inventory {
        let stock = catalog::product_ids().map(|id| (id, RESTOCK_TO)).collect();
        Inventory {
            stock: Mutex::new(stock),
        }
    }

    pub(crate) fn handle(&self, req: &Req) -> Response<Body> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/healthz") => web::healthy(),
            (&Method::POST, "/reserve") => match web::parse_json(&req.body) {
                Ok(r) => self.reserve(r),
                Err(reject) => reject.into(),
            },
            (&Method::GET, path) => match web::id_after(path, "/stock/") {
                Some(id) => match self.stock().get(&id) {
                    Some(available) => {
                        web::json(StatusCode::OK, &json!({ "id": id, "available": available }))
                    }
                    None => web::error(StatusCode::NOT_FOUND, "no such product"),
                },
                None => web::not_found(),
            },
            _ => web::not_found(),
        }
    }

    fn reserve(&self, Reserve { id, quantity }: Reserve) -> Response<Body> {
        if quantity == 0 {
            return web::error(StatusCode::BAD_REQUEST, "quantity must be at least 1");
        }
        let mut stock = self.stock();
        let Some(available) = stock.get_mut(&id) else {
            return web::error(StatusCode::NOT_FOUND, "no such product");
        };
        if *available < quantity {
            let had = std::mem::replace(available, RESTOCK_TO);
            let body = json!({ "error": "out of stock", "id": id, "available": had });
            return web::json(StatusCode::CONFLICT, &body);
        }
        *available -= quantity;
        let body = json!({ "id": id, "reserved": quantity, "remaining": *available });
        web::json(StatusCode::OK, &body)
    }

    /// The map stays consistent even if a holder panicked, so poisoning is ignored.
    fn stock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u32>> {
        self.stock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
