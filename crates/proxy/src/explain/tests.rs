use super::*;

/// A proxy in `shop` fronting `shop/app` (inbound, with authorization) and calling
/// `shop/catalog` (routes, two endpoints), `shop/empty` (no endpoints) and `shop/limited`
/// (an outbound rate limit of one request), plus an HTTP proxy listener.
const YAML: &str = "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: p, namespace: shop}
spec:
  admin: {address: 127.0.0.1:0}
  inbound:
    - {name: in, address: 127.0.0.1:0, forwardTo: '127.0.0.1:9', service: app}
  outbound:
    - {name: catalog, address: 127.0.0.1:0, service: {name: catalog}}
    - {name: empty, address: 127.0.0.1:0, service: {name: empty}}
    - {name: limited, address: 127.0.0.1:0, service: {name: limited}}
    - {name: proxy, address: 127.0.0.1:0, httpProxy: true}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: app, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2, namespace: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: '127.0.0.1:3'}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: limited, namespace: shop}
spec:
  ports: [{port: 80}]
  endpoints: [{address: '127.0.0.1:4'}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: catalog, port: 80}]
  rules:
    - matches: [{path: {type: Exact, value: /items/special}, headers: [{name: x-tier, value: gold}]}]
      backendRefs: [{name: catalog-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /items}, method: POST}]
      backendRefs: [{name: catalog, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /items}}]
      backendRefs: [{name: catalog, port: 80, weight: 3}, {name: catalog-v2, port: 80, weight: 1}]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRef: {kind: Service, name: app}
  action: Deny
  rules:
    - to: {paths: [/public/*]}
      from: {identities: ['spiffe://td/ns/shop/sa/nobody']}
    - to: {paths: [/admin/*]}
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: one, namespace: shop}
spec:
  targetRef: {kind: Service, name: limited}
  direction: Outbound
  limits: [{name: all, rate: 1, per: 1h, burst: 1}]
";

fn snapshot() -> Snapshot {
    let resources = trellis_api::parse_documents("t.yaml", YAML).unwrap();
    Snapshot::build(&resources, 1, "t.yaml", None, &crate::Shared::new())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn ask(
    direction: &str,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Ask {
    Ask {
        direction: (!direction.is_empty()).then(|| direction.to_string()),
        source: Some("spiffe://td/ns/shop/sa/orders".into()),
        method: method.into(),
        authority: authority.into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        listener: None,
    }
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

#[tokio::test]
async fn explanations_name_the_route_policy_and_endpoint_that_decide() {
    let snap = snapshot();
    let now = tokio::time::Instant::now();
    let wall = jiff::Timestamp::now();
    // (direction, authority, method, path, headers, [(JSON path, expected)])
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a [(&'a str, Value)],
    );
    let cases: &[Case] = &[
        // The gold rule wins over the others.
        (
            "",
            "catalog",
            "GET",
            "/items/special",
            &[("x-tier", "gold")],
            &[
                ("outcome", json!("forwarded")),
                ("route.id", json!("shop/catalog/0")),
                ("backend.name", json!("shop/catalog-v2:80")),
                ("notMatched", json!([])),
            ],
        ),
        // Without the header: the exact rule and the POST rule lose, each with its reason;
        // the weighted rule's two backends are listed with their shares.
        (
            "",
            "catalog",
            "GET",
            "/items/special",
            &[],
            &[
                ("outcome", json!("forwarded")),
                ("route.id", json!("shop/catalog/2")),
                ("notMatched.0.route", json!("shop/catalog/0")),
                (
                    "notMatched.0.why",
                    json!("header x-tier is absent (wanted = \"gold\")"),
                ),
                ("notMatched.1.route", json!("shop/catalog/1")),
                ("notMatched.1.why", json!("method GET is not POST")),
                ("backend.name", json!("shop/catalog:80")),
                ("backends.0.share", json!(0.75)),
                ("backends.1.backend", json!("shop/catalog-v2:80")),
                ("endpoint.rank", json!(0)),
                ("endpoint.candidates", json!(["127.0.0.1:1", "127.0.0.1:2"])),
            ],
        ),
        // No rule matches: 404, and the closest rule is named.
        (
            "",
            "catalog",
            "GET",
            "/itemz",
            &[],
            &[
                ("outcome", json!("no_route")),
                ("status", json!(404)),
                ("route.closest.route", json!("shop/catalog/2")),
                ("reason", json!("no route matched GET /itemz")),
            ],
        ),
        // By Host: the outbound listener of the service the Host names.
        (
            "",
            "catalog.shop:80",
            "POST",
            "/items/1",
            &[],
            &[
                ("listener", json!("catalog")),
                ("route.id", json!("shop/catalog/1")),
                ("outcome", json!("forwarded")),
            ],
        ),
        (
            "",
            "nothing.shop",
            "GET",
            "/",
            &[],
            &[
                ("outcome", json!("no_route")),
                ("error", json!("unknown_host")),
            ],
        ),
        // No endpoints.
        (
            "",
            "empty",
            "GET",
            "/",
            &[],
            &[
                ("outcome", json!("unavailable")),
                ("status", json!(503)),
                ("reason", json!("no available endpoint for shop/empty:80")),
                ("route.id", json!("default")),
            ],
        ),
        // Inbound: the Deny policy's second rule decides.
        (
            "inbound",
            "app",
            "GET",
            "/admin/x",
            &[],
            &[
                ("outcome", json!("denied")),
                ("status", json!(403)),
                ("authorization.decidedBy", json!("shop/no-admin")),
                ("authorization.policies.0.matchedRule", json!(1)),
                (
                    "authorization.policies.0.rules.0.why",
                    json!("from.identities does not match"),
                ),
                ("reason", json!("denied by shop/no-admin")),
            ],
        ),
        (
            "inbound",
            "app",
            "GET",
            "/public/x",
            &[],
            &[
                ("outcome", json!("forwarded")),
                ("authorization.allow", json!(true)),
                (
                    "authorization.policies.0.rules.0.why",
                    json!("from.identities does not match"),
                ),
                ("route.id", json!("inbound")),
            ],
        ),
        // The path is made canonical first, as the request path does.
        (
            "inbound",
            "app",
            "GET",
            "/public/../admin/x",
            &[],
            &[("outcome", json!("denied"))],
        ),
    ];
    for (direction, authority, method, path, headers, want) in cases {
        let got = explain(
            &snap,
            &ask(direction, authority, method, path, headers),
            now,
            wall,
        )
        .unwrap();
        for (at, value) in *want {
            assert_eq!(
                get(&got, at),
                value,
                "{method} {authority}{path} {headers:?}: {at} in {got:#}"
            );
        }
        assert!(
            !got["summary"].as_str().unwrap().is_empty(),
            "a summary: {got:#}"
        );
    }
}

#[tokio::test]
async fn agrees_with_decide_for_every_case() {
    // The route an explanation names is the one `decide` picks for the same head.
    let snap = snapshot();
    let listener = snap
        .listeners
        .iter()
        .find(|l| &*l.name == "catalog")
        .unwrap();
    for (method, path, hdr) in [
        ("GET", "/items/special", Some("gold")),
        ("GET", "/items/special", None),
        ("POST", "/items/x", None),
        ("GET", "/nothing", None),
    ] {
        let a = ask(
            "",
            "catalog",
            method,
            path,
            &hdr.map_or(vec![], |v| vec![("x-tier", v)]),
        );
        let parts = head(&a).unwrap();
        let want = match decide::decide(&snap, listener, &parts, 0) {
            Decision::Forward(f) => json!(&*f.route),
            _ => Value::Null,
        };
        let got = explain(
            &snap,
            &a,
            tokio::time::Instant::now(),
            jiff::Timestamp::now(),
        )
        .unwrap();
        assert_eq!(got["route"]["id"], want, "{method} {path}: {got:#}");
    }
}

#[tokio::test]
async fn rate_limits_are_peeked_never_charged() {
    let snap = snapshot();
    let now = tokio::time::Instant::now();
    let a = ask("", "limited", "GET", "/", &[]);
    for _ in 0..3 {
        let got = explain(&snap, &a, now, jiff::Timestamp::now()).unwrap();
        assert_eq!(got["outcome"], "forwarded", "{got:#}");
        assert_eq!(got["rateLimits"][0]["allowed"], true, "{got:#}");
    }
    // Spend the one token the way the request path does; now it is refused.
    let limit = &snap.limits.backends["shop/limited:80"].limits()[0];
    let crate::ratelimit::State::One(bucket) = &*limit.state else {
        panic!("one shared bucket");
    };
    assert!(matches!(
        bucket.take(now),
        crate::ratelimit::Take::Allowed { .. }
    ));
    let got = explain(&snap, &a, now, jiff::Timestamp::now()).unwrap();
    assert_eq!(got["outcome"], "rate_limited", "{got:#}");
    assert_eq!(got["status"], 429);
    assert_eq!(got["rateLimits"][0]["limit"], "shop/one/all");
}

#[tokio::test]
async fn failing_endpoints_are_ranked_below_healthy_ones() {
    let snap = snapshot();
    let now = tokio::time::Instant::now();
    let a = ask("", "catalog", "POST", "/items", &[]);
    let backend = snap
        .endpoints
        .iter()
        .find(|((addr, _), _)| addr.port() == 1)
        .map(|(_, e)| e.clone())
        .unwrap();
    backend.failed(now);
    let got = explain(&snap, &a, now, jiff::Timestamp::now()).unwrap();
    assert_eq!(
        got["endpoint"]["candidates"],
        json!(["127.0.0.1:2"]),
        "{got:#}"
    );
    assert_eq!(got["endpoints"][0]["reason"], "backed off after a failure");
    assert_eq!(got["endpoints"][0]["rank"], 1);
    // Both failing: the proxy still tries them, and says so.
    let other = snap
        .endpoints
        .iter()
        .find(|((addr, _), _)| addr.port() == 2)
        .map(|(_, e)| e.clone())
        .unwrap();
    other.failed(now);
    let got = explain(&snap, &a, now, jiff::Timestamp::now()).unwrap();
    assert_eq!(got["endpoint"]["rank"], 1, "{got:#}");
    assert!(
        got["endpoint"]["why"]
            .as_str()
            .unwrap()
            .contains("every endpoint failed"),
        "{got:#}"
    );
}

#[test]
fn bad_requests_and_unknown_listeners_are_clear_errors() {
    let snap = snapshot();
    let now = tokio::time::Instant::now();
    let wall = jiff::Timestamp::now();
    let mut a = ask("", "catalog", "GET", "items", &[]);
    let e = explain(&snap, &a, now, wall).unwrap_err().to_string();
    assert!(e.contains("must start with '/'"), "{e}");
    a.path = "/".into();
    a.direction = Some("sideways".into());
    let e = explain(&snap, &a, now, wall).unwrap_err().to_string();
    assert!(e.contains("use inbound or outbound"), "{e}");
    a.direction = None;
    a.listener = Some("nope".into());
    let e = explain(&snap, &a, now, wall).unwrap_err().to_string();
    assert!(e.contains("no listener \"nope\""), "{e}");
}
