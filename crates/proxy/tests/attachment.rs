//! Which routes and rules apply, through a real proxy on loopback: `sectionName` picks one
//! Service port, consumer routes apply only to clients in their own namespace (and replace the
//! producer's there), ties go to the older route by time, and spec-valid sets that used to be
//! refused (identical matches, header names differing in case) route as the spec says.
//! Mirrors the mesh conformance cases mesh-ports and mesh-consumer-route.

mod support;

use http::Request;
use http_body_util::Full;
use std::net::SocketAddr;
use support::*;

/// A `Proxy` in `namespace` with the given outbound listeners (`name: target` lines).
fn proxy_in(namespace: &str, listeners: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: {namespace}}}\nspec:\n  admin: {{address: 127.0.0.1:0}}\n  requestTimeout: 5s\n  outbound:\n"
    );
    for (name, target) in listeners {
        y += &format!("    - {{name: {name}, address: 127.0.0.1:0, {target}}}\n");
    }
    y
}

/// A Service in `namespace` with `ports` (YAML) and one endpoint.
fn service_in(namespace: &str, name: &str, ports: &str, endpoint: SocketAddr) -> String {
    format!(
        "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ports: {ports}\n  endpoints: [{{address: '{endpoint}'}}]\n"
    )
}

fn http_route(namespace: &str, name: &str, meta: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {namespace}{meta}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}"
    )
}

fn to(backend: &str, namespace: &str, port: u16) -> String {
    format!("    - backendRefs: [{{name: {backend}, namespace: {namespace}, port: {port}}}]\n")
}

async fn upstream_of(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let got = send(&h1_client(), b.body(Full::default()).unwrap()).await;
    assert_eq!(got.status, 200, "{path}: {got:?}");
    got.upstream()
}

#[tokio::test]
async fn section_name_attaches_a_route_to_the_named_port_only() {
    let (web, v2) = (upstream("web").await, upstream("v2").await);
    let yaml = proxy_in(
        "default",
        &[
            ("http", "service: {name: web, port: 8080}"),
            ("admin", "service: {name: web, port: 9090}"),
        ],
    ) + &service_in(
        "default",
        "web",
        "[{name: http, port: 8080}, {name: admin, port: 9090}]",
        web.addr,
    ) + &service_in("default", "v2", "[{port: 80}]", v2.addr)
        + &http_route(
            "default",
            "admin-only",
            "",
            "{group: '', kind: Service, name: web, sectionName: admin}",
            &to("v2", "default", 80),
        );
    let p = start_proxy(&yaml).await;
    assert_eq!(upstream_of(p.addr("admin").await, "/", &[]).await, "v2");
    assert_eq!(upstream_of(p.addr("http").await, "/", &[]).await, "web");
}

/// Service `echo` in `prod` with a producer route (to `v1`) and a consumer route in `shop`
/// with the same (default) match (to `v2`), seen from a proxy in `namespace`, by listener and
/// by Host.
async fn consumer_setup(namespace: &str) -> (TestProxy, Vec<support::Upstream>) {
    let ups = vec![
        upstream("echo").await,
        upstream("v1").await,
        upstream("v2").await,
    ];
    let yaml = proxy_in(
        namespace,
        &[
            ("echo", "service: {name: echo, namespace: prod}"),
            ("proxy", "httpProxy: true"),
        ],
    ) + &service_in("prod", "echo", "[{port: 80}]", ups[0].addr)
        + &service_in("prod", "v1", "[{port: 80}]", ups[1].addr)
        + &service_in("prod", "v2", "[{port: 80}]", ups[2].addr)
        + &http_route(
            "prod",
            "producer",
            "",
            "{group: '', kind: Service, name: echo}",
            &to("v1", "prod", 80),
        )
        + &http_route(
            "shop",
            "consumer",
            "",
            "{group: '', kind: Service, name: echo, namespace: prod}",
            &to("v2", "prod", 80),
        );
    (start_proxy(&yaml).await, ups)
}

#[tokio::test]
async fn consumer_routes_apply_only_to_clients_in_their_namespace() {
    for (namespace, want) in [("shop", "v2"), ("prod", "v1"), ("default", "v1")] {
        let (p, _ups) = consumer_setup(namespace).await;
        assert_eq!(
            upstream_of(p.addr("echo").await, "/", &[]).await,
            want,
            "listener, client in {namespace}"
        );
        let proxy_addr = p.addr("proxy").await;
        let got = send(
            &h1_client(),
            Request::get(format!("http://{proxy_addr}/"))
                .header("host", "echo.prod")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(got.upstream(), want, "by Host, client in {namespace}");
    }
}

#[tokio::test]
async fn precedence_ties_go_to_the_older_route_by_time() {
    let ups = [
        upstream("web").await,
        upstream("a").await,
        upstream("b").await,
    ];
    // As text, "…00.5Z" sorts before "…00Z"; as times it is half a second later.
    let yaml = proxy_in("default", &[("web", "service: {name: web}")])
        + &service_in("default", "web", "[{port: 80}]", ups[0].addr)
        + &service_in("default", "a", "[{port: 80}]", ups[1].addr)
        + &service_in("default", "b", "[{port: 80}]", ups[2].addr)
        + &http_route(
            "default",
            "a",
            ", creationTimestamp: '2026-01-01T00:00:00.5Z'",
            "{name: web}",
            &to("a", "default", 80),
        )
        + &http_route(
            "default",
            "b",
            ", creationTimestamp: '2026-01-01T00:00:00Z'",
            "{name: web}",
            &to("b", "default", 80),
        );
    let p = start_proxy(&yaml).await;
    assert_eq!(upstream_of(p.addr("web").await, "/", &[]).await, "b");
}

#[tokio::test]
async fn identical_matches_and_header_names_differing_in_case_route_as_the_spec_says() {
    let ups = [
        upstream("web").await,
        upstream("v1").await,
        upstream("v2").await,
    ];
    let m = "      matches: [{path: {value: /x}, headers: [{name: X-Env, value: canary}, {name: x-env, value: prod}]}]\n";
    let yaml = proxy_in("default", &[("web", "service: {name: web}")])
        + &service_in("default", "web", "[{port: 80}]", ups[0].addr)
        + &service_in("default", "v1", "[{port: 80}]", ups[1].addr)
        + &service_in("default", "v2", "[{port: 80}]", ups[2].addr)
        + &http_route(
            "default",
            "r",
            "",
            "{name: web}",
            &format!(
                "{}{m}{}{m}",
                to("v1", "default", 80),
                to("v2", "default", 80)
            ),
        );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("web").await;
    // The first rule wins; of the two conditions on one header name, the first counts.
    assert_eq!(upstream_of(addr, "/x", &[("x-env", "canary")]).await, "v1");
    let got = send(
        &h1_client(),
        Request::get(format!("http://{addr}/x"))
            .header("x-env", "prod")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 404, "{got:?}");
}
