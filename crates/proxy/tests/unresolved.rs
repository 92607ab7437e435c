//! Backend references that do not resolve, through a real proxy: the Gateway API accepts the
//! route, answers the missing backend's weighted share with 500 (gRPC: UNAVAILABLE), drops
//! mirrors to it, and traffic flows to it once the Service appears.

mod support;

use support::*;

const N: usize = 400;

/// With p = 1/2 and N = 400 the standard deviation is 10: five of them either side.
fn about_half(n: usize) -> bool {
    (N / 2 - 50..=N / 2 + 50).contains(&n)
}

const ROUTE: &str = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: web, port: 8080}]
  rules:
    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}]
      backendRefs:
        - {name: v1, port: 8080}
        - {name: v2, port: 8080}
";

/// Sends N requests; returns how many each upstream answered, and the 500s (by reason).
async fn spread(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, usize> {
    let client = h1_client();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..N {
        let got = get_via(&client, addr, "/").await;
        let key = match got.status.as_u16() {
            200 => got.upstream(),
            500 => format!(
                "500 {}",
                got.headers
                    .get("trellis-proxy-error")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            ),
            other => panic!("unexpected {other}: {got:?}"),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

#[tokio::test]
async fn a_missing_backends_share_is_answered_with_500_until_it_appears() {
    let (web, v1, v2) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("v2").await,
    );
    let base = format!(
        "{}{}{}",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web.addr]),
        service_yaml("v1", 8080, &[v1.addr]),
    );
    let p = start_proxy(&format!("{base}{ROUTE}")).await;
    let addr = p.addr("out").await;

    let seen = spread(addr).await;
    let missing = "500 route default/split/0: Service default/v2 does not exist";
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(about_half(seen["v1"]), "{seen:?}");
    assert!(about_half(seen[missing]), "{seen:?}");
    // The mirror to a Service that does not exist sends nothing; each copy it would have
    // sent (one per forwarded request: the failed share is never forwarded) is counted.
    assert_eq!(
        p.metric("trellis_http_mirror_backend_not_found_total{direction=\"outbound\",route=\"default/split/0\",backend=\"default/shadow:8080\"}"),
        seen["v1"] as f64
    );

    // The Service appears (a reload, as the file watcher or the control plane does it).
    let with_v2 = format!("{base}{}{ROUTE}", service_yaml("v2", 8080, &[v2.addr]));
    let resources = trellis_api::parse_documents("test.yaml", &with_v2).unwrap();
    p.proxy.apply(&resources, "test.yaml").await.unwrap();
    let seen = spread(addr).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(about_half(seen["v1"]), "{seen:?}");
    assert!(about_half(seen["v2"]), "{seen:?}");
}
