//! Distributed tracing through the demo's order path with real processes: `trellis control`,
//! the four demo apps under `trellis run`, a client sidecar, and an OTLP collector in this
//! test decoding the spans with the official OpenTelemetry protobuf definitions. One order
//! is one trace with a span at every proxy hop, linked into one tree.

mod support;

#[path = "../../proxy/tests/support/collector.rs"]
mod collector;

use collector::{Collector, Got};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

const TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const CALLER: &str = "10f067aa0ba902b8";

#[test]
fn one_order_is_one_trace_with_a_span_at_every_proxy_hop() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut collector = rt.block_on(Collector::grpc());
    let dir = TempDir::new("tracing");
    let cp = ControlPlane::start_in(dir.path());
    let telemetry = dir.write(
        "telemetry.yaml",
        &format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh-tracing}}
spec:
  tracing: {{collector: '{}', samplingPercent: 0, flushInterval: 50ms}}
",
            collector.endpoint()
        ),
    );
    let (code, out, err) = cp.cli(&["apply", "-f", telemetry.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    let url = cp.url();
    let service = |name: &'static str, app: &'static str, extra: &[&str], env: &[(&str, &str)]| {
        let t = token(&cp, name);
        let port = free_port().to_string();
        let mut args = vec![
            "--control",
            &url,
            "--service",
            name,
            "--port",
            &port,
            "--health",
            "http:/healthz",
            "--ttl",
            "2s",
            "--token",
            &t,
        ];
        args.extend_from_slice(extra);
        run(dir.path(), name, &args, &[bin(), "demo-app", app], env)
    };
    let _catalog = service(
        "product-catalog",
        "product-catalog",
        &[],
        &[("DEMO_VERSION", "v1")],
    );
    let _inventory = service("inventory", "inventory", &[], &[]);
    let _payment = service("payment", "payment", &[], &[]);
    let (c, i, p) = (free_port(), free_port(), free_port());
    let ups = [
        format!("product-catalog={c}"),
        format!("inventory={i}"),
        format!("payment={p}"),
    ];
    let base = |port: u16| format!("http://127.0.0.1:{port}");
    let (cu, iu, pu) = (base(c), base(i), base(p));
    let _orders = service(
        "order-processing",
        "order-processing",
        &[
            "--upstream",
            &ups[0],
            "--upstream",
            &ups[1],
            "--upstream",
            &ups[2],
        ],
        &[
            ("CATALOG_URL", &cu),
            ("INVENTORY_URL", &iu),
            ("PAYMENT_URL", &pu),
        ],
    );
    let front = free_port();
    let client_token = token(&cp, "shopper");
    let _client = run(
        dir.path(),
        "shopper",
        &[
            "--control",
            &url,
            "--upstream",
            &format!("order-processing={front}"),
            "--token",
            &client_token,
        ],
        &["sleep", "600"],
        &[],
    );
    let order = r#"{"product_id": 1, "quantity": 1}"#;
    // Ready when an order goes through every sidecar (untraced: sampling is 0%).
    wait_for(READY, "an order through the mesh", || {
        http("POST", front, "/orders", order)
            .ok()
            .filter(|r| r.status == 201)
    });

    // The caller decided to sample; every proxy honours it.
    let parent = format!("00-{TRACE}-{CALLER}-01");
    let r = http_with("POST", front, "/orders", &[("traceparent", &parent)], order).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);

    let mut seen = Vec::new();
    let of_trace = |s: &[Got]| s.iter().filter(|g| g.trace_hex() == TRACE).count();
    rt.block_on(collector.until(&mut seen, |s| of_trace(s) >= 8));
    // A moment more, so that a stray ninth span of this trace would show.
    std::thread::sleep(Duration::from_millis(300));
    rt.block_on(collector.until(&mut seen, |_| true));
    let spans: Vec<&Got> = seen.iter().filter(|g| g.trace_hex() == TRACE).collect();
    // shopper → order-processing, then order-processing → catalog, inventory and payment:
    // a CLIENT span at the calling sidecar and a SERVER span at the called one, each time.
    assert_eq!(spans.len(), 8, "{spans:#?}");
    // The only untraced parent is the caller's span: one tree.
    let by_id: BTreeMap<String, &Got> = spans.iter().map(|g| (g.span_hex(), *g)).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|g| !by_id.contains_key(&g.parent_hex()))
        .collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    let root = roots[0];
    assert_eq!(root.parent_hex(), CALLER);
    assert_eq!(root.span.kind, 3, "the shopper's sidecar sends: CLIENT");
    let service_of = |g: &Got| g.resource_attr("service.name").unwrap_or_default();
    // A client-only sidecar is known by its proxy id.
    assert!(!service_of(root).is_empty());
    let mut servers: Vec<String> = Vec::new();
    for g in &spans {
        assert_eq!(g.status_code(), 0, "no errors: {g:#?}");
        let code = g.attr("http.response.status_code").unwrap();
        assert!(code == "200" || code == "201", "{g:#?}");
        assert!(g.attr("http.request.method").is_some() && g.attr("url.path").is_some());
        match g.span.kind {
            2 => {
                // A SERVER span's parent is the CLIENT span of the sidecar that called it.
                let parent = by_id[&g.parent_hex()];
                assert_eq!(parent.span.kind, 3, "{g:#?}");
                assert_eq!(g.attr("trellis.direction").as_deref(), Some("inbound"));
                // Sidecar to sidecar is mutual TLS: the caller's identity is known.
                let peer = g.attr("trellis.peer.identity").unwrap_or_default();
                assert!(peer.starts_with("spiffe://"), "{g:#?}");
                servers.push(service_of(g));
            }
            3 => {
                assert_eq!(g.attr("trellis.direction").as_deref(), Some("outbound"));
                assert!(g.attr("trellis.backend").is_some() && g.attr("http.route").is_some());
                assert!(g.attr("trellis.upstream").is_some(), "{g:#?}");
                // The endpoint proved who it is over mutual TLS: the service this call reached.
                let callee = spans
                    .iter()
                    .find(|c| c.span.kind == 2 && c.parent_hex() == g.span_hex())
                    .expect("every call reaches a sidecar");
                let peer = g.attr("trellis.peer.identity").unwrap_or_default();
                assert!(
                    peer.starts_with("spiffe://")
                        && peer.ends_with(&format!("/sa/{}", service_of(callee))),
                    "{g:#?}"
                );
                // order-processing's calls are children of its own SERVER span, through the
                // app, which passed the context on.
                if g.span_hex() != root.span_hex() {
                    let parent = by_id[&g.parent_hex()];
                    assert_eq!(parent.span.kind, 2);
                    assert_eq!(service_of(parent), "order-processing");
                    assert_eq!(service_of(g), "order-processing");
                }
            }
            k => panic!("span kind {k}"),
        }
    }
    servers.sort();
    assert_eq!(
        servers,
        [
            "inventory",
            "order-processing",
            "payment",
            "product-catalog"
        ]
    );
    let paths: Vec<String> = spans
        .iter()
        .filter(|g| g.span.kind == 3)
        .filter_map(|g| g.attr("url.path"))
        .collect();
    for p in ["/orders", "/products/1", "/reserve", "/charge"] {
        assert!(paths.iter().any(|x| x == p), "{p} in {paths:?}");
    }
}
