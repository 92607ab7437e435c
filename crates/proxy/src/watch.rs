//! Hot reload of a config file: poll its contents and apply changes. An invalid file is
//! logged with its located errors and the previous config keeps serving.

use crate::Proxy;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Watches `path` every `interval` until the proxy drains, applying each version that differs
/// from the last one seen (`loaded` is what the proxy started from, so a change made while it
/// was starting is not missed).
/// Polling (rather than inotify) also catches editors that replace the file and configs on
/// network filesystems, at the cost of up to `interval` delay.
pub async fn watch_file(proxy: Arc<Proxy>, path: PathBuf, loaded: Vec<u8>, interval: Duration) {
    let mut last = Some(loaded);
    let draining = proxy.shared.draining.clone();
    loop {
        tokio::select! {
            _ = draining.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Ok(bytes) = tokio::fs::read(&path).await else {
            continue;
        };
        if last.as_ref() == Some(&bytes) {
            continue;
        }
        last = Some(bytes.clone());
        let source = path.display().to_string();
        let text = String::from_utf8_lossy(&bytes);
        let result = match trellis_api::parse_documents(&source, &text) {
            Ok(resources) => proxy.apply(&resources, &source).await,
            Err(d) => {
                proxy
                    .shared
                    .metrics
                    .reloads
                    .get_or_create(&crate::metrics::ResultLabels { result: "error" })
                    .inc();
                Err(d.into())
            }
        };
        match result {
            Ok(version) => tracing::info!(%source, version, "config reloaded"),
            Err(e) => {
                tracing::error!(%source, "config rejected; previous config keeps serving:\n{e}")
            }
        }
    }
}
