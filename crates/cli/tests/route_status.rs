//! Route status from a real control plane: `trellis get httproutes|grpcroutes -o yaml|json`
//! shows the conditions computed from the current config, and they follow it.

mod support;

use serde_json::Value;
use support::*;

const ROUTES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - backendRefs:
        - {name: catalog, port: 8080}
        - {name: catalog-v3, port: 8080}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: catalog-grpc}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - backendRefs: [{name: catalog-v3, port: 8080}]
"#;

const V3: &str = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v3}
spec:
  ports: [{port: 8080}]
";

/// `(type, status, reason)` of each condition of the route's only parent, from `-o json`.
fn conditions(cp: &ControlPlane, kind: &str, name: &str) -> Vec<(String, String, String)> {
    let (code, out, err) = cp.cli(&["get", kind, name, "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let items: Value = serde_json::from_str(&out).unwrap();
    let parents = items[0]["status"]["parents"].as_array().unwrap().clone();
    assert_eq!(parents.len(), 1, "{out}");
    assert_eq!(parents[0]["controllerName"], "trellis.dev/mesh", "{out}");
    assert_eq!(parents[0]["parentRef"]["name"], "catalog", "{out}");
    parents[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["lastTransitionTime"].is_string(), "{out}");
            assert!(!c["message"].as_str().unwrap().is_empty(), "{out}");
            let s = |f: &str| c[f].as_str().unwrap().to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect()
}

fn want(resolved: (&str, &str)) -> Vec<(String, String, String)> {
    vec![
        ("Accepted".into(), "True".into(), "Accepted".into()),
        ("ResolvedRefs".into(), resolved.0.into(), resolved.1.into()),
    ]
}

#[test]
fn get_shows_route_conditions_that_follow_the_config() {
    let dir = TempDir::new("route-status");
    let cp = ControlPlane::start_in(dir.path());
    let routes = dir.write("routes.yaml", ROUTES);
    let (code, out, err) = cp.cli(&["apply", "-f", routes.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "a route to a Service that does not exist is accepted: {out}{err}"
    );

    let missing = want(("False", "BackendNotFound"));
    assert_eq!(conditions(&cp, "httproutes", "catalog"), missing);
    assert_eq!(conditions(&cp, "grpcroutes", "catalog-grpc"), missing);
    let (code, yaml, err) = cp.cli(&["get", "httproutes", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "controllerName: trellis.dev/mesh",
        "reason: BackendNotFound",
        "spec.rules[0].backendRefs[1]: Service default/catalog-v3 does not exist",
    ] {
        assert!(yaml.contains(line), "want {line:?} in\n{yaml}");
    }

    // The Service appears: every reference resolves.
    let v3 = dir.write("v3.yaml", V3);
    let (code, out, err) = cp.cli(&["apply", "-f", v3.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let resolved = want(("True", "ResolvedRefs"));
    assert_eq!(conditions(&cp, "httproutes", "catalog"), resolved);
    assert_eq!(conditions(&cp, "grpcroutes", "catalog-grpc"), resolved);

    // Deleting it is allowed, as the Gateway API allows it; the condition goes back.
    let (code, out, err) = cp.cli(&["delete", "service", "catalog-v3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(conditions(&cp, "httproutes", "catalog"), missing);

    // Other kinds carry no status.
    let (_, out, _) = cp.cli(&["get", "services", "-o", "json"]);
    let items: Value = serde_json::from_str(&out).unwrap();
    assert!(items[0].get("status").is_none(), "{out}");
}
