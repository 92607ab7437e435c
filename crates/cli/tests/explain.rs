//! `trellis explain` against a real control plane and real sidecars (`trellis run`): for
//! each case the explanation is compared with what the sidecar actually did with the same
//! request, sent right after (status and the proxy's reason header).

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

const CONFIG: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  ports: [{port: 80}]
  selector: {app: product-catalog, version: v1}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: stock}
spec:
  ports: [{port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{group: "", kind: Service, name: product-catalog}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /products}, headers: [{name: x-tier, value: gold}]}]
      backendRefs: [{name: catalog-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /products}}]
      backendRefs: [{name: catalog-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /admin}}]
      backendRefs: [{name: catalog-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /stock}}]
      backendRefs: [{name: stock, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: limited}
spec:
  parentRefs: [{group: "", kind: Service, name: product-catalog}]
  rules:
    - matches: [{path: {type: Exact, value: /products/2}}]
      backendRefs: [{name: catalog-v1, port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: once}
spec:
  targetRef: {kind: HTTPRoute, name: limited}
  limits: [{name: all, rate: 1, per: 1h, burst: 1}]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: product-catalog}
  action: Deny
  rules:
    - to: {paths: [/products/secret]}
    - to: {paths: [/admin/*]}
"#;

/// A proposed route: `/products/1` exactly, to the service with no instances.
const PROPOSED: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-one}
spec:
  parentRefs: [{group: "", kind: Service, name: product-catalog}]
  rules:
    - matches: [{path: {type: Exact, value: /products/1}}]
      backendRefs: [{name: stock, port: 80}]
"#;

/// `trellis explain ... -o json` through the client's proxy; the parsed answer.
fn explain(cp: &ControlPlane, node: &str, args: &[&str]) -> Value {
    let mut all = vec!["explain", "--proxy", node, "-o", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = cp.cli(&all);
    assert_eq!(code, 0, "explain {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// What the sidecar did: status and its reason header.
fn sent(port: u16, path: &str, header: Option<(&str, &str)>) -> (u16, Option<String>) {
    let r = match header {
        Some(h) => get_with(port, path, h),
        None => get(port, path),
    }
    .unwrap();
    (r.status, r.headers.get("trellis-proxy-error").cloned())
}

#[test]
fn explanations_agree_with_what_the_sidecars_do() {
    let dir = TempDir::new("explain");
    let SmallMesh {
        cp,
        up,
        catalog: _catalog,
        client: _client,
    } = small_mesh(&dir);
    let config = dir.write("config.yaml", CONFIG);
    let (code, out, err) = cp.cli(&["apply", "-f", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    // The client's proxy, by node id, as `get proxies` lists it.
    let node = client_node(&cp);

    // The config reached the sidecars: the route to `stock` answers 503.
    wait_for(READY, "the routes to reach the client's sidecar", || {
        (sent(up, "/stock", None).0 == 503).then_some(())
    });
    wait_for(READY, "the policy to reach the catalog's sidecar", || {
        (sent(up, "/admin/x", None).0 == 403).then_some(())
    });

    // (case, path, header, explanation checks (JSON path, value), status the sidecar gives)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<(&'a str, &'a str)>,
        &'a [(&'a str, &'a str)],
        u16,
    );
    let cases: &[Case] = &[
        (
            "forwarded, the header rule losing with its reason",
            "/products/1",
            None,
            &[
                ("outcome", "forwarded"),
                ("route.id", "default/catalog/1"),
                ("notMatched.0.route", "default/limited/0"),
                (
                    "notMatched.0.why",
                    "path /products/1 does not match exact /products/2",
                ),
                ("notMatched.1.route", "default/catalog/0"),
                (
                    "notMatched.1.why",
                    "header x-tier is absent (wanted = \"gold\")",
                ),
                ("backend.name", "default/catalog-v1:80"),
                ("authorization.allow", "true"),
            ],
            200,
        ),
        (
            "the gold rule",
            "/products/1",
            Some(("x-tier", "gold")),
            &[("outcome", "forwarded"), ("route.id", "default/catalog/0")],
            200,
        ),
        (
            "denied by the policy's second rule, at the catalog's sidecar",
            "/admin/x",
            None,
            &[
                ("outcome", "denied"),
                ("status", "403"),
                ("authorization.decidedBy", "default/no-admin"),
                ("authorization.policies.0.matchedRule", "1"),
                (
                    "authorization.policies.0.rules.0.why",
                    "to.paths does not match",
                ),
                ("inbound.direction", "inbound"),
            ],
            403,
        ),
        (
            "no route: the closest is named",
            "/product",
            None,
            &[
                ("outcome", "no_route"),
                ("status", "404"),
                ("route.closest.route", "default/catalog/1"),
            ],
            404,
        ),
        (
            "every endpoint down: the service has no instance",
            "/stock/1",
            None,
            &[
                ("outcome", "unavailable"),
                ("status", "503"),
                ("error", "no_endpoint"),
                (
                    "unavailable.why",
                    "default/stock has no registered instance",
                ),
            ],
            503,
        ),
    ];
    for (case, path, header, checks, status) in cases {
        let mut args = vec![format!("product-catalog{path}")];
        if let Some((k, v)) = header {
            args.push("-H".into());
            args.push(format!("{k}: {v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = explain(&cp, &node, &args);
        for (at, want) in *checks {
            let v = at.split('.').fold(&got, |v, k| match k.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[k],
            });
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(&text, want, "{case}: {at} in {got:#}");
        }
        // What the sidecars did with the same request.
        let (real, reason) = sent(up, path, *header);
        assert_eq!(
            real, *status,
            "{case}: the sidecar answered {real} ({reason:?})"
        );
        if real != 200 {
            assert_eq!(got["status"], real, "{case}: {got:#}");
        }
        // Outbound errors carry the client's full reason: the explanation names it.
        if *status == 404 || *status == 503 {
            assert_eq!(got["reason"].as_str(), reason.as_deref(), "{case}");
        }
    }

    // Rate limited: explaining spends nothing; the one request allowed does.
    let first = explain(&cp, &node, &["product-catalog/products/2"]);
    assert_eq!(first["outcome"], "forwarded", "{first:#}");
    assert_eq!(first["rateLimits"][0]["allowed"], true, "{first:#}");
    let again = explain(&cp, &node, &["product-catalog/products/2"]);
    assert_eq!(
        again["outcome"], "forwarded",
        "explaining took no token: {again:#}"
    );
    assert_eq!(sent(up, "/products/2", None).0, 200);
    let limited = explain(&cp, &node, &["product-catalog/products/2"]);
    assert_eq!(limited["outcome"], "rate_limited", "{limited:#}");
    assert_eq!(limited["rateLimits"][0]["limit"], "default/once/all");
    let (real, reason) = sent(up, "/products/2", None);
    assert_eq!(real, 429);
    // The same refusal (the seconds to wait may have moved on by one).
    let upto = |r: Option<&str>| {
        r.and_then(|r| r.split(", retry after").next())
            .map(str::to_string)
    };
    assert_eq!(upto(limited["reason"].as_str()), upto(reason.as_deref()));
    assert!(
        upto(reason.as_deref()).is_some_and(|r| r.contains("default/once/all")),
        "{reason:?}"
    );

    // --with: what a proposed route would change, without applying it.
    let proposed = dir.write("proposed.yaml", PROPOSED);
    let with = explain(
        &cp,
        &node,
        &[
            "product-catalog/products/1",
            "--with",
            proposed.to_str().unwrap(),
        ],
    );
    let changes = with["changes"].to_string();
    assert!(
        changes.contains("route would change from default/catalog/1 to default/catalog-one/0"),
        "{with:#}"
    );
    assert!(
        changes.contains("outcome would change from forwarded to unavailable"),
        "{with:#}"
    );
    assert_eq!(sent(up, "/products/1", None).0, 200, "nothing was applied");
    // Applied for real, the sidecar does what the explanation said.
    let (code, out, err) = cp.cli(&["apply", "-f", proposed.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for(READY, "the proposed route to take effect", || {
        (sent(up, "/products/1", None).0 == 503).then_some(())
    });
    let now = explain(&cp, &node, &["product-catalog/products/1"]);
    assert_eq!(now["route"]["id"], "default/catalog-one/0", "{now:#}");

    // A bad proposal is refused whole, with where and what.
    let bad = dir.write(
        "bad.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x}\nspec:\n  parentRefs: [{group: '', kind: Service, name: nothing}]\n  rules: [{backendRefs: [{name: nothing, port: 80}]}]\n",
    );
    let (code, out, err) = cp.cli(&[
        "explain",
        "--proxy",
        &node,
        "product-catalog/",
        "--with",
        bad.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("with") && err.contains("nothing"), "{err}");

    // A request tap showed, by its id: explained at the proxy that saw it.
    let out_file = dir.path().join("tap.out");
    let log = dir.path().join("tap.log");
    let child = trellis()
        .args([
            "tap",
            "--direction",
            "outbound",
            "--path",
            "/products/5",
            "--max",
            "1",
        ])
        .args(["--duration", "30s", "-o", "json"])
        .env("TRELLIS_CONTROL", cp.url())
        .env("TRELLIS_ADMIN_TOKEN_FILE", &cp.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut tap = Proc {
        name: "tap".into(),
        child,
        log,
    };
    wait_for(Duration::from_secs(40), "tap to show a request", || {
        if tap.exited() {
            return Some(());
        }
        let _ = get(up, "/products/5");
        None
    });
    let shown = std::fs::read_to_string(&out_file).unwrap();
    let id = shown
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["requestId"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("a requestId in the tap: {shown}{}", tap.log_text()));
    let (code, out, err) = cp.cli(&["explain", "--request-id", &id, "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let by_id: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(by_id["outcome"], "forwarded", "{by_id:#}");
    assert_eq!(by_id["route"]["id"], "default/catalog/1", "{by_id:#}");
    assert_eq!(by_id["tapped"]["status"], 200, "{by_id:#}");
    assert_eq!(by_id["tapped"]["route"], by_id["route"]["id"], "{by_id:#}");
    let (code, _, err) = cp.cli(&["explain", "--request-id", "r999999"]);
    assert_ne!(code, 0);
    assert!(err.contains("not among the last"), "{err}");

    // Text output: the summary, then a line per decision.
    let (code, out, err) = cp.cli(&["explain", "--proxy", &node, "product-catalog/admin/x"]);
    assert_eq!(code, 0, "a denied request is an answer: {err}");
    assert!(out.starts_with("403 denied"), "{out}");
    assert!(out.contains("authorization  "), "{out}");
    // An unknown proxy is an error.
    let (code, _, err) = cp.cli(&["explain", "--proxy", "nope", "product-catalog/"]);
    assert_ne!(code, 0);
    assert!(err.contains("proxy \"nope\" is not connected"), "{err}");
}
