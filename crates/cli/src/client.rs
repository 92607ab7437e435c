//! A small client for the control plane's HTTP/JSON config API.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The control plane a CLI command talks to.
pub struct Api {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A refusal from the API: its error lines.
#[derive(Debug)]
pub struct Refused {
    pub errors: Vec<String>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.errors.join("\n"))
    }
}

impl std::error::Error for Refused {}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            // With several replicas listed, the CLI talks to the first.
            base: crate::run::endpoints(base)
                .into_iter()
                .next()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: admin_token(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(http::Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = serde_json::to_vec(body)?;
        self.call(http::Method::POST, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| anyhow!("{url}: no answer within 30s"))?
            .with_context(|| {
                format!(
                    "cannot reach the control plane at {} (is `trellis control` running? set --control or TRELLIS_CONTROL)",
                    self.base
                )
            })?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            #[derive(serde::Deserialize)]
            struct ErrorBody {
                errors: Vec<String>,
            }
            let errors = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors)
                .unwrap_or_else(|_| vec![format!("{status}: {}", String::from_utf8_lossy(&bytes))]);
            return Err(Refused { errors }.into());
        }
        serde_json::from_slice(&bytes).with_context(|| format!("reading the answer from {url}"))
    }
}

/// The admin token: `TRELLIS_ADMIN_TOKEN`, else the file `TRELLIS_ADMIN_TOKEN_FILE` names,
/// else `trellis-data/admin-token` (where `trellis control` with its default store writes it).
fn admin_token() -> Option<String> {
    if let Ok(t) = std::env::var("TRELLIS_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let file = std::env::var_os("TRELLIS_ADMIN_TOKEN_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "trellis-data/admin-token".into());
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Fails unless `text` is a URL this client can use.
pub fn check_url(text: &str) -> Result<()> {
    for url in crate::run::endpoints(text) {
        if !url.starts_with("http://") {
            bail!("control plane URL {url:?} must start with http://");
        }
    }
    Ok(())
}
