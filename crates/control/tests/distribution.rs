//! Config distribution with a view larger than one response part: the control plane sends
//! it in parts to a proxy that accepts them (and whole to one that does not), and a real
//! proxy following it applies the parts together and shows on `/config` exactly the
//! resources the control plane sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_control::store::StoreSpec;
use trellis_control::{Control, Settings, SourceFile};
use trellis_proxy::control::{ControlTls, Follow, HeldSet, follow};

/// Services in the view: their JSON is several times one part.
const SERVICES: usize = 400;

/// How often the following proxy's memory hook (`Follow::release`) ran.
static RELEASED: AtomicUsize = AtomicUsize::new(0);

fn released() {
    RELEASED.fetch_add(1, Ordering::SeqCst);
}

struct Plane {
    control: Arc<Control>,
    url: String,
    stop: CancellationToken,
    dir: PathBuf,
}

async fn start() -> Plane {
    let dir = std::env::temp_dir().join(format!(
        "trellis-distribution-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let settings = Settings {
        insecure: true,
        admin_token_file: Some(dir.join("store/admin-token")),
        ..Settings::default()
    };
    let control = Control::open(&StoreSpec::Dir(dir.join("store")), settings)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(trellis_control::serve(
        control.clone(),
        listener,
        stop.clone(),
    ));
    let mut yaml = String::new();
    for i in 0..SERVICES {
        yaml += &format!(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc{i}, labels: {{app: svc{i}}}}}\nspec:\n  ports: [{{port: 80, name: http}}]\n  endpoints: [{{address: \"127.0.0.1:{}\"}}, {{address: \"127.0.0.2:{}\"}}]\n",
            1000 + i,
            1000 + i
        );
    }
    control
        .apply(
            &[SourceFile {
                name: "services.yaml".into(),
                text: yaml,
            }],
            false,
        )
        .await
        .unwrap();
    Plane {
        control,
        url,
        stop,
        dir,
    }
}

impl Plane {
    async fn tls(&self) -> ControlTls {
        let (token, _) = self
            .control
            .create_token("default", "client", Duration::from_secs(600), 10)
            .await
            .unwrap();
        ControlTls {
            insecure: true,
            token: Some(token),
            ..ControlTls::default()
        }
    }

    /// A mesh-wide proxy (one HTTP proxy listener) and how it follows this control plane
    /// as node `id`, with `release` as its memory hook and `limit` as its response limit.
    async fn follower(
        &self,
        id: &str,
        release: Option<fn()>,
        limit: usize,
    ) -> (Arc<trellis_proxy::Proxy>, Follow) {
        let local = trellis_api::parse_documents(
            "proxy.yaml",
            "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {name: client}\nspec:\n  admin: {address: \"127.0.0.1:0\"}\n  outbound: [{name: mesh, address: \"127.0.0.1:0\", httpProxy: true}]\n",
        )
        .unwrap();
        let proxy = trellis_proxy::Proxy::start(&local, "proxy.yaml")
            .await
            .unwrap();
        let cfg = Follow {
            endpoints: vec![self.url.clone()],
            node: wire::Node {
                id: id.into(),
                namespace: "default".into(),
                all_services: true,
                ..Default::default()
            },
            local,
            state_file: None,
            tls: self.tls().await,
            release,
            max_response_bytes: limit,
        };
        (proxy, cfg)
    }

    /// Every message of one response to a hello from a mesh-wide proxy, up to the last part.
    async fn response(&self, parts: bool) -> Vec<wire::StreamResponse> {
        let tls = self.tls().await;
        let channel = tls.connect(&self.url, None, |e| e).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(wire::StreamRequest {
            node: Some(wire::Node {
                id: format!("reader-{parts}"),
                namespace: "default".into(),
                all_services: true,
                parts,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let token = tls.token.clone().unwrap();
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut stream = MeshClient::new(channel)
            .stream(request)
            .await
            .unwrap()
            .into_inner();
        let mut out = vec![];
        while let Some(m) = stream.message().await.unwrap() {
            let more = m.more;
            out.push(m);
            if !more {
                break;
            }
        }
        drop(tx);
        out
    }
}

fn by_key(messages: &[wire::StreamResponse]) -> BTreeMap<String, serde_json::Value> {
    messages
        .iter()
        .flat_map(|m| &m.resources)
        .map(|r| (r.key.clone(), serde_json::from_str(&r.json).unwrap()))
        .collect()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn a_large_view_goes_in_parts_to_a_proxy_that_accepts_them_and_whole_otherwise() {
    bounded(async {
        let cp = start().await;
        let whole = cp.response(false).await;
        assert_eq!(whole.len(), 1, "one message without parts");
        let parts = cp.response(true).await;
        assert!(parts.len() > 2, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.more, i + 1 < parts.len());
            assert_eq!(p.nonce, parts[0].nonce);
            assert_eq!(p.system_version, parts[0].system_version);
            let size: usize = p.resources.iter().map(|r| r.key.len() + r.json.len()).sum();
            assert!(
                size <= trellis_control::PART_BYTES,
                "part {i}: {size} bytes"
            );
        }
        let all = by_key(&whole);
        assert_eq!(all.len(), SERVICES);
        assert_eq!(by_key(&parts), all);
        cp.stop.cancel();
        let _ = std::fs::remove_dir_all(&cp.dir);
    })
    .await;
}

#[tokio::test]
async fn a_proxy_applies_a_view_sent_in_parts_and_its_config_shows_what_was_sent() {
    bounded(async {
        let cp = start().await;
        let sent = by_key(&cp.response(false).await);
        let (proxy, cfg) = cp
            .follower(
                "client-1",
                Some(released),
                trellis_proxy::control::MAX_RESPONSE_BYTES,
            )
            .await;
        let first = Arc::downgrade(&proxy.snapshot());
        let following = tokio::spawn(follow(proxy.clone(), cfg, HeldSet::default()));
        while RELEASED.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(proxy.snapshot().services.len(), SERVICES);
        // Applied once, with every part: the snapshot it started with, then this one.
        assert_eq!(proxy.snapshot().version, 2);
        // The memory hook ran once, for that update, and by then no second snapshot was
        // alive: nothing kept the one it replaced.
        assert_eq!(RELEASED.load(Ordering::SeqCst), 1);
        assert!(
            first.upgrade().is_none(),
            "the replaced snapshot is still alive"
        );
        // /config, as an operator reads it: the local Proxy, then exactly what was sent.
        let admin = proxy.admin_addr();
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(admin).unwrap();
            write!(
                s,
                "GET /config HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
        .await
        .unwrap();
        let (head, doc) = body.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let doc: serde_json::Value = serde_json::from_str(doc).unwrap();
        let resources = doc["resources"].as_array().unwrap();
        assert_eq!(resources[0]["kind"], "Proxy");
        let shown: BTreeMap<String, serde_json::Value> = resources[1..]
            .iter()
            .map(|r| {
                let m = &r["metadata"];
                let key = format!(
                    "{}/{}/{}",
                    r["kind"].as_str().unwrap(),
                    m["namespace"].as_str().unwrap_or("default"),
                    m["name"].as_str().unwrap()
                );
                (key, r.clone())
            })
            .collect();
        assert_eq!(shown.len(), resources.len() - 1, "a resource shown twice");
        assert_eq!(shown, sent);
        following.abort();
        proxy.drain(Duration::from_secs(1)).await;
        cp.stop.cancel();
        let _ = std::fs::remove_dir_all(&cp.dir);
    })
    .await;
}

/// A response larger than the proxy takes (here a limit below the view's size, which the
/// control plane sends in parts) is refused after its last part: the control plane records
/// the refusal with its reason, and the proxy keeps serving the config it had.
#[tokio::test]
async fn a_response_past_the_proxys_limit_is_refused_and_its_config_kept() {
    bounded(async {
        let cp = start().await;
        // Below what the view takes, but not half of it: refused with a NACK after its last
        // part (past twice the limit the proxy would end the stream instead).
        let texts: usize = cp
            .response(true)
            .await
            .iter()
            .flat_map(|m| &m.resources)
            .map(|r| r.key.len() + r.version.len() + r.json.len())
            .sum();
        let limit = texts * 3 / 4;
        let (proxy, cfg) = cp.follower("client-limited", None, limit).await;
        let before = proxy.snapshot().version;
        let following = tokio::spawn(follow(proxy.clone(), cfg, HeldSet::default()));
        let status = loop {
            if let Some(p) = cp
                .control
                .proxies()
                .into_iter()
                .find(|p| p.node == "client-limited")
            {
                assert!(p.acked_version.is_empty(), "the proxy took the view: {p:?}");
                if p.nack.is_some() {
                    break p;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let why = status.nack.clone().unwrap();
        assert!(
            why.contains(&format!("takes more than the {limit} bytes a response may")),
            "{why}"
        );
        assert!(status.acked_version.is_empty(), "{status:?}");
        // Still the config it started with.
        assert_eq!(proxy.snapshot().version, before);
        assert!(proxy.snapshot().services.is_empty());
        following.abort();
        proxy.drain(Duration::from_secs(1)).await;
        cp.stop.cancel();
        let _ = std::fs::remove_dir_all(&cp.dir);
    })
    .await;
}
