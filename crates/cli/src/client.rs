//! A small client for the control plane's HTTP/JSON config API.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::sync::Arc;

/// The control plane a CLI command talks to: over TLS, verified with the trust bundle
/// (`ca.pem`), unless `--insecure` with an `http://` URL.
pub struct Api {
    base: String,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
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
    pub fn new(base: &str, insecure: bool, ca_file: Option<PathBuf>) -> Result<Api> {
        // With several replicas listed, the CLI talks to the first.
        let base = crate::run::endpoints(base)
            .into_iter()
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        trellis_proxy::control::check_scheme(&base, insecure).map_err(|e| anyhow!(e))?;
        let tls = if base.starts_with("https://") {
            let file = ca_file.unwrap_or_else(default_ca_file);
            let bundle = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "reading the control plane's trust bundle {} (`trellis control` writes ca.pem beside its admin token; pass --ca-file or TRELLIS_CA_FILE)",
                    file.display()
                )
            })?;
            let config = trellis_identity::control::control_client_config(
                &trellis_identity::ControlTrust::Bundle(bundle),
                None,
                &[b"http/1.1"],
            )
            .with_context(|| format!("{}", file.display()))?;
            Some(config)
        } else {
            tracing::warn!(url = %base, "--insecure: talking to the control plane in plaintext");
            None
        };
        Ok(Api {
            base,
            tls,
            token: admin_token(),
        })
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
        let resp = tokio::time::timeout(std::time::Duration::from_secs(30), self.send(req))
            .await
            .map_err(|_| anyhow!("{url}: no answer within 30s"))??;
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
    /// A GET whose answer is newline-delimited and streamed: `line` sees each line as it
    /// arrives, until the answer ends or `line` returns `false`.
    pub async fn get_lines(&self, path: &str, mut line: impl FnMut(&str) -> bool) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder().method(http::Method::GET).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(30), self.send(req))
            .await
            .map_err(|_| anyhow!("{url}: no answer within 30s"))??;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            #[derive(serde::Deserialize)]
            struct ErrorBody {
                errors: Vec<String>,
            }
            let errors = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors)
                .unwrap_or_else(|_| vec![format!("{status}: {}", String::from_utf8_lossy(&bytes))]);
            return Err(Refused { errors }.into());
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(i + 1);
                let text = String::from_utf8_lossy(&pending[..i]).into_owned();
                pending = rest;
                if !line(&text) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// One request on its own connection (TLS unless insecure).
    async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let unreachable = || {
            format!(
                "cannot reach the control plane at {} (is `trellis control` running? set --control or TRELLIS_CONTROL)",
                self.base
            )
        };
        let uri = req.uri().clone();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(unreachable)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .with_context(|| format!("{host}: not a server name"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with the control plane at {}", self.base))?;
                exchange(TokioIo::new(tls), req)
                    .await
                    .with_context(unreachable)
            }
            None => exchange(TokioIo::new(tcp), req)
                .await
                .with_context(unreachable),
        }
    }
}

async fn exchange<IO>(
    io: IO,
    mut req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    // Origin form on the wire; the Host header names the authority.
    if let Some(a) = req.uri().authority().cloned() {
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_str(a.as_str())?);
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    *req.uri_mut() = path.parse()?;
    Ok(sender.send_request(req).await?)
}

/// `TRELLIS_CA_FILE` is handled by clap; by default `ca.pem` beside the admin token file.
fn default_ca_file() -> PathBuf {
    admin_token_file()
        .parent()
        .map_or_else(|| PathBuf::from("ca.pem"), |d| d.join("ca.pem"))
}

fn admin_token_file() -> PathBuf {
    std::env::var_os("TRELLIS_ADMIN_TOKEN_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "trellis-data/admin-token".into())
}

/// The admin token: `TRELLIS_ADMIN_TOKEN`, else the file `TRELLIS_ADMIN_TOKEN_FILE` names,
/// else `trellis-data/admin-token` (where `trellis control` with its default store writes it).
fn admin_token() -> Option<String> {
    if let Ok(t) = std::env::var("TRELLIS_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    std::fs::read_to_string(admin_token_file())
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Fails unless every URL in `text` fits the security mode.
pub fn check_url(text: &str, insecure: bool) -> Result<()> {
    for url in crate::run::endpoints(text) {
        if let Err(e) = trellis_proxy::control::check_scheme(&url, insecure) {
            bail!("{e}");
        }
    }
    Ok(())
}
