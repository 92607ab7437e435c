//! Route matching and filters through a real proxy: each match kind, each filter, weighted
//! splits and mirroring. Cases mirror the Gateway API conformance suite's HTTPRoute and
//! GRPCRoute tests (matching, precedence, header modifiers, redirects, rewrites, mirrors).

mod support;

use http::Request;
use http_body_util::Full;
use std::collections::HashMap;
use std::time::Duration;
use support::*;

const ROUTE_HEAD: &str = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: web, port: 8080}]
  rules:
";

/// Starts services web (the parent, upstream "web"), v1 and v2, and the given rules.
async fn setup(rules: &str) -> (TestProxy, std::net::SocketAddr) {
    let (web, v1, v2) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("v2").await,
    );
    let yaml = format!(
        "{}{}{}{}{ROUTE_HEAD}{rules}",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web.addr]),
        service_yaml("v1", 8080, &[v1.addr]),
        service_yaml("v2", 8080, &[v2.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    (p, addr)
}

async fn req(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&h1_client(), b.body(Full::default()).unwrap()).await
}

#[tokio::test]
async fn matching_and_precedence() {
    let rules = "
    - matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: Exact, value: /exact}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /pre/}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /pre/longer}}]
      backendRefs: [{name: v2, port: 8080}]
    - matches: [{path: {type: RegularExpression, value: '/re/[0-9]+'}}]
      backendRefs: [{name: v2, port: 8080}]
    - matches: [{path: {value: /m}, method: POST}]
      backendRefs: [{name: v2, port: 8080}]
    - matches: [{path: {value: /h}, headers: [{name: X-Version, value: two}]}]
      backendRefs: [{name: v2, port: 8080}]
    - matches: [{path: {value: /h}, headers: [{type: RegularExpression, name: x-version, value: 'o.e'}]}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {value: /q}, queryParams: [{name: env, value: canary}]}]
      backendRefs: [{name: v2, port: 8080}]
    - matches: [{path: {value: /both}, headers: [{name: a, value: '1'}]}, {path: {value: /both}, queryParams: [{name: a, value: '1'}]}]
      backendRefs: [{name: v1, port: 8080}]
";
    let (_p, addr) = setup(rules).await;
    // (method, path, headers, expected upstream)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: &[Case] = &[
        ("GET", "/", &[], "web"),
        ("GET", "/exact", &[], "v1"),
        ("GET", "/exact/", &[], "web"),
        ("GET", "/exactly", &[], "web"),
        ("GET", "/pre", &[], "v1"),
        ("GET", "/pre/x", &[], "v1"),
        ("GET", "/prefix", &[], "web"),
        ("GET", "/pre/longer/x", &[], "v2"),
        ("GET", "/pre/longerx", &[], "v1"),
        ("GET", "/re/123", &[], "v2"),
        ("GET", "/re/12a", &[], "web"),
        ("POST", "/m", &[], "v2"),
        ("GET", "/m", &[], "web"),
        ("GET", "/h", &[("x-version", "two")], "v2"),
        ("GET", "/h", &[("X-VERSION", "one")], "v1"),
        ("GET", "/h", &[("x-version", "three")], "web"),
        ("GET", "/q?env=canary", &[], "v2"),
        ("GET", "/q?x=1&env=canary", &[], "v2"),
        ("GET", "/q?env=prod", &[], "web"),
        ("GET", "/both", &[("a", "1")], "v1"),
        ("GET", "/both?a=1", &[], "v1"),
        ("GET", "/both", &[], "web"),
    ];
    for (method, path, headers, want) in cases {
        let got = req(addr, method, path, headers).await;
        assert_eq!(got.status, 200, "{method} {path}");
        assert_eq!(got.upstream(), *want, "{method} {path} {headers:?}");
    }
}

#[tokio::test]
async fn no_match_is_404_and_empty_backends_500() {
    let rules = "
    - matches: [{path: {type: Exact, value: /only}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: Exact, value: /zero}}]
      backendRefs: [{name: v1, port: 8080, weight: 0}]
";
    let (_p, addr) = setup(rules).await;
    let got = req(addr, "GET", "/other", &[]).await;
    assert_eq!(got.status, 404);
    assert!(
        got.headers["trellis-proxy-error"]
            .to_str()
            .unwrap()
            .contains("no route matched GET /other")
    );
    assert_eq!(req(addr, "GET", "/zero", &[]).await.status, 500);
}

#[tokio::test]
async fn header_modifiers() {
    let rules = "
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-set, value: set-value}]
            add: [{name: x-add, value: added}]
            remove: [x-remove]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: x-upstream, value: overridden}]
            add: [{name: x-resp-add, value: r}]
            remove: [content-type]
      backendRefs:
        - name: v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-backend, value: v1}]}
";
    let (_p, addr) = setup(rules).await;
    let got = req(
        addr,
        "GET",
        "/",
        &[
            ("x-set", "original"),
            ("x-add", "first"),
            ("x-remove", "gone"),
        ],
    )
    .await;
    assert_eq!(got.upstream(), "overridden");
    assert_eq!(got.headers["x-resp-add"], "r");
    assert!(got.headers.get("content-type").is_none());
    let seen = &got.json()["headers"];
    assert_eq!(seen["x-set"], serde_json::json!(["set-value"]));
    assert_eq!(seen["x-add"], serde_json::json!(["first", "added"]));
    assert!(seen.get("x-remove").is_none());
    assert_eq!(seen["x-backend"], serde_json::json!(["v1"]));
}

#[tokio::test]
async fn redirects() {
    let rules = "
    - matches: [{path: {type: PathPrefix, value: /secure}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: new.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    - matches: [{path: {type: Exact, value: /full}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 9090, path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}}}]
";
    let (_p, addr) = setup(rules).await;
    let host = [("host", "web:8080")];
    let cases = [
        ("/secure/a?x=1", 301, "https://web/secure/a?x=1"),
        ("/old/page", 302, "http://new.example:8080/new/page"),
        ("/full", 302, "http://web:9090/elsewhere"),
    ];
    for (path, status, location) in cases {
        let got = req(addr, "GET", path, &host).await;
        assert_eq!(got.status.as_u16(), status, "{path}");
        assert_eq!(got.headers["location"], location, "{path}");
    }
}

#[tokio::test]
async fn url_rewrites() {
    let rules = "
    - matches: [{path: {type: PathPrefix, value: /api/v1}}]
      filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /strip}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /full}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
      backendRefs: [{name: v1, port: 8080}]
";
    let (_p, addr) = setup(rules).await;
    let cases = [
        ("/api/v1/items?page=2", "/v1/items?page=2"),
        ("/api/v1", "/v1"),
        ("/strip/three", "/three"),
        ("/strip", "/"),
        ("/full/any/thing", "/replaced"),
    ];
    for (path, want) in cases {
        let got = req(addr, "GET", path, &[]).await;
        assert_eq!(got.json()["path"], want, "{path}");
    }
    let got = req(addr, "GET", "/api/v1/x", &[]).await;
    assert_eq!(
        got.json()["headers"]["host"],
        serde_json::json!(["rewritten.internal"])
    );
}

#[tokio::test]
async fn weighted_split_90_10() {
    let rules = "
    - backendRefs:
        - {name: v1, port: 8080, weight: 90}
        - {name: v2, port: 8080, weight: 10}
";
    let (_p, addr) = setup(rules).await;
    let client = h1_client();
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 2000;
    for _ in 0..n {
        let got = send(
            &client,
            Request::get(format!("http://{addr}/"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        *counts.entry(got.upstream()).or_default() += 1;
    }
    let v2 = counts.get("v2").copied().unwrap_or(0);
    // Binomial(2000, 0.1): sd ~13.4; allow 4 sd.
    assert!((146..=254).contains(&v2), "{counts:?}");
    assert_eq!(counts.get("v1").copied().unwrap_or(0) + v2, n);
}

#[tokio::test]
async fn mirror_copies_requests_and_discards_responses() {
    let (web, v1, shadow) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("shadow").await,
    );
    let yaml = format!(
        "{}{}{}{}{ROUTE_HEAD}
    - matches: [{{path: {{value: /all}}}}]
      filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 8080}}}}}}]
      backendRefs: [{{name: v1, port: 8080}}]
    - matches: [{{path: {{value: /half}}}}]
      filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 8080}}, percent: 50}}}}]
      backendRefs: [{{name: v1, port: 8080}}]
",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web.addr]),
        service_yaml("v1", 8080, &[v1.addr]),
        service_yaml("shadow", 8080, &[shadow.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    for _ in 0..20 {
        let got = get(addr, "/all").await;
        assert_eq!(got.upstream(), "v1", "the client sees the primary's answer");
    }
    for _ in 0..400 {
        get(addr, "/half").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mirrored = shadow.hits.load(std::sync::atomic::Ordering::Relaxed);
    // 20 + Binomial(400, 0.5) (sd 10): allow 4 sd.
    assert!((20 + 160..=20 + 240).contains(&mirrored), "{mirrored}");
    assert_eq!(v1.hits.load(std::sync::atomic::Ordering::Relaxed), 420);
}

#[tokio::test]
async fn grpc_routes_by_service_and_method() {
    let (web, v1, v2) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("v2").await,
    );
    let yaml = format!(
        "{}{}{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g}}
spec:
  parentRefs: [{{name: web}}]
  rules:
    - matches: [{{method: {{service: shop.Catalog}}}}]
      backendRefs: [{{name: v1, port: 8080}}]
    - matches: [{{method: {{service: shop.Catalog, method: Buy}}}}]
      backendRefs: [{{name: v2, port: 8080}}]
    - matches: [{{method: {{type: RegularExpression, service: 'shop\\.Ord.*'}}, headers: [{{name: x-tier, value: gold}}]}}]
      filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-tier-routed, value: gold}}]}}}}]
      backendRefs: [{{name: v2, port: 8080}}]
",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web.addr]),
        service_yaml("v1", 8080, &[v1.addr]),
        service_yaml("v2", 8080, &[v2.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let client = h2_client();
    let call = |path: &'static str, tier: Option<&'static str>| {
        let mut b = Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = tier {
            b = b.header("x-tier", t);
        }
        b.body(Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let cases = [
        ("/shop.Catalog/List", None, Some("v1")),
        ("/shop.Catalog/Buy", None, Some("v2")),
        ("/shop.Orders/Get", Some("gold"), Some("v2")),
        ("/shop.Orders/Get", Some("silver"), None),
        ("/other.Svc/Get", None, None),
    ];
    for (path, tier, want) in cases {
        let got = send(&client, call(path, tier)).await;
        match want {
            Some(w) => assert_eq!(got.upstream(), w, "{path} {tier:?}"),
            // gRPC clients get a trailers-only UNIMPLEMENTED, not a bare 404.
            None => assert_eq!(got.headers["grpc-status"], "12", "{path} {tier:?}"),
        }
    }
    let got = send(&client, call("/shop.Orders/Get", Some("gold"))).await;
    assert_eq!(got.headers["x-tier-routed"], "gold");
}

#[tokio::test]
async fn http_proxy_mode_routes_by_host() {
    let (web, v1) = (upstream("web").await, upstream("v1").await);
    let yaml = format!(
        "{}{}{}",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web.addr]),
        service_yaml("v1", 8080, &[v1.addr])
    );
    let p = start_proxy(&yaml).await;
    let proxy = p.addr("http-proxy").await;
    let client = h1_client();
    for (host, want) in [
        ("web", "web"),
        ("v1:8080", "v1"),
        ("v1.default", "v1"),
        ("web.default.svc.cluster.local:8080", "web"),
    ] {
        let got = send(
            &client,
            Request::get(format!("http://{proxy}/"))
                .header("host", host)
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(got.upstream(), want, "{host}");
    }
    // Absolute-form, as an app with HTTP_PROXY set sends it.
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET http://v1:8080/abs HTTP/1.1\r\nHost: v1:8080\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.contains("x-upstream: v1") && out.contains("\"path\":\"/abs\""),
        "{out}"
    );
    let got = send(
        &client,
        Request::get(format!("http://{proxy}/"))
            .header("host", "unknown")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 404);
}
