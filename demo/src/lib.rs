//! The demo services `trellis demo` runs, each as its own process: a product catalog (whose
//! version makes a canary visible), order processing that calls the other three, inventory,
//! payment, and a load generator that drives order processing at a steady rate.
#![forbid(unsafe_code)]

pub mod capacity;
mod catalog;
mod config;
mod inventory;
mod load;
mod orders;
mod payment;
mod web;

use http_body_util::Full;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;

pub use catalog::VERSION_HEADER;
pub use config::Config;
pub use load::{LoadSummary, generate};

/// One of the demo applications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    Catalog,
    Orders,
    Inventory,
    Payment,
    Load,
}

impl App {
    /// Every app, in the order `trellis demo` starts them.
    pub const ALL: [App; 5] = [
        App::Catalog,
        App::Inventory,
        App::Payment,
        App::Orders,
        App::Load,
    ];

    pub fn parse(name: &str) -> Option<App> {
        App::ALL.into_iter().find(|app| app.name() == name)
    }

    /// The service name, which is also the Host other apps use in HTTP proxy mode.
    pub fn name(self) -> &'static str {
        match self {
            App::Catalog => "product-catalog",
            App::Orders => "order-processing",
            App::Inventory => "inventory",
            App::Payment => "payment",
            App::Load => "load-generator",
        }
    }
}

/// Why a demo app could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid {var}={value:?}: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{app} needs {var}")]
    Missing {
        app: &'static str,
        var: &'static str,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0} does not serve HTTP")]
    NotAServer(&'static str),
}

/// Runs `app` until `shutdown` resolves. Servers listen on `127.0.0.1:PORT`.
pub async fn run(
    app: App,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    if app == App::Load {
        return generate(&config, shutdown).await.map(drop);
    }
    let port = config.port.ok_or(DemoError::Missing {
        app: app.name(),
        var: "PORT",
    })?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, source })?;
    serve(app, config, listener, shutdown).await
}

/// Serves a server app on an already bound listener (tests bind port 0), ignoring `PORT`.
pub async fn serve(
    app: App,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    let service = match app {
        App::Catalog => Service::Catalog(catalog::Catalog::new(config.version.clone())),
        App::Inventory => Service::Inventory(inventory::Inventory::new()),
        App::Payment => Service::Payment(payment::Payment::new(config.payment_failure_rate)),
        App::Orders => Service::Orders(Box::new(orders::Orders::new(&config)?)),
        App::Load => return Err(DemoError::NotAServer(app.name())),
    };
    match listener.local_addr() {
        Ok(addr) => tracing::info!(app = app.name(), %addr, "demo app listening"),
        Err(_) => tracing::info!(app = app.name(), "demo app listening"),
    }
    let behaviour = web::Behaviour {
        latency: config.latency,
        fail_status: config.fail_status,
    };
    web::serve(listener, Arc::new(service), behaviour, shutdown).await;
    Ok(())
}

/// The server apps, so one accept loop can serve any of them.
enum Service {
    Catalog(catalog::Catalog),
    Inventory(inventory::Inventory),
    Payment(payment::Payment),
    Orders(Box<orders::Orders>),
}

impl Service {
    async fn handle(&self, req: &web::Req) -> http::Response<Full<bytes::Bytes>> {
        match self {
            Service::Catalog(app) => app.handle(req),
            Service::Inventory(app) => app.handle(req),
            Service::Payment(app) => app.handle(req),
            Service::Orders(app) => app.handle(req).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for app in App::ALL {
            assert_eq!(App::parse(app.name()), Some(app));
        }
        assert_eq!(App::parse("catalog"), None);
    }
}
