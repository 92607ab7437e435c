//! payment: captures charges, declining a configurable fraction so the demo has business
//! errors to show next to network ones.

use crate::web::{self, Body, Req};
use http::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Deserialize)]
struct Charge {
    order_id: u64,
    amount_cents: u64,
}

pub(crate) struct Payment {
    failure_rate: f64,
    /// xorshift64 state; declines only need to look random, not be unpredictable.
    rng: AtomicU64,
    charges: AtomicU64,
}

impl Payment {
    pub(crate) fn new(failure_rate: f64) -> Payment {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = (u64::from(nanos) << 32 | u64::from(std::process::id())) | 1;
        Payment {
            failure_rate,
            rng: AtomicU64::new(seed),
            charges: AtomicU64::new(1),
        }
    }

    pub(crate) fn handle(&self, req: &Req) -> Response<Body> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/healthz") => web::healthy(),
            (&Method::POST, "/charge") => match web::parse_json(&req.body) {
                Ok(charge) => self.charge(charge),
                Err(reject) => reject.into(),
            },
            _ => web::not_found(),
        }
    }

    fn charge(
        &self,
        Charge {
            order_id,
            amount_cents,
        }: Charge,
    ) -> Response<Body> {
        if self.roll() < self.failure_rate {
            let body = json!({ "status": "declined", "order_id": order_id });
            return web::json(StatusCode::PAYMENT_REQUIRED, &body);
        }
        let charge_id = format!("ch_{}", self.charges.fetch_add(1, Ordering::Relaxed));
        let body = json!({
            "charge_id": charge_id,
            "order_id": order_id,
            "amount_cents": amount_cents,
            "status": "captured",
        });
        web::json(StatusCode::OK, &body)
    }

    /// A number in [0, 1).
    fn roll(&self) -> f64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let prev = self
            .rng
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        // The top 53 bits fill an f64 mantissa exactly.
        (step(prev) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_spread_over_the_unit_interval() {
        let p = Payment::new(0.5);
        let rolls: Vec<f64> = (0..10_000).map(|_| p.roll()).collect();
        assert!(rolls.iter().all(|r| (0.0..1.0).contains(r)));
        let low = rolls.iter().filter(|r| **r < 0.5).count();
        assert!((4_500..5_500).contains(&low), "{low} of 10000 below 0.5");
    }
}
