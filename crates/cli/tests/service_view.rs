//! The per-service view's policy data, end to end: sidecars report authorization decisions
//! and the endpoints they eject on their report streams, and the control plane's service
//! API (`GET /v1/stats?namespace=…&service=…`) shows them; and `trellis explain` finds a
//! request by its id in a real access log.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

/// The service API's answer for product-catalog.
fn catalog_view(cp: &ControlPlane) -> Value {
    let r = cp
        .api_get("/v1/stats?window=30s&namespace=default&service=product-catalog")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[test]
fn denials_count_under_their_policy_and_rule_and_explain_finds_the_logged_request() {
    let dir = TempDir::new("service-authz");
    let SmallMesh {
        cp,
        up,
        catalog: _catalog,
        client: _client,
    } = small_mesh(&dir);
    let log = dir.path().join("client-access.log");
    let config = dir.write(
        "policy.yaml",
        &format!(
            r#"
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  targetRef: {{kind: Service, name: product-catalog}}
  action: Deny
  rules:
    - to: {{paths: [/products/secret]}}
    - to: {{paths: [/admin/*]}}
---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh-log}}
spec:
  accessLog: {{path: '{}'}}
"#,
            log.display()
        ),
    );
    let (code, out, err) = cp.cli(&["apply", "-f", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for(READY, "the policy to reach the catalog's sidecar", || {
        (get(up, "/admin/x").ok()?.status == 403).then_some(())
    });
    // A real denial with an id to find it by, and allowed requests.
    let denied = get_with(up, "/admin/x", ("x-request-id", "deny-me-1")).unwrap();
    assert_eq!(denied.status, 403, "{}", denied.body);
    for _ in 0..3 {
        assert_eq!(get(up, "/products/1").unwrap().status, 200);
    }

    // The catalog's sidecar reported them: the denials under the policy's second rule
    // (index 1), the allowed requests under what allowed them (the default).
    let view = wait_for(READY, "the decisions in the service API", || {
        let v = catalog_view(&cp);
        let rows = v["authz"].as_array()?.clone();
        let deny = rows
            .iter()
            .find(|r| r["policy"] == "default/no-admin" && r["rule"] == 1)?;
        let allowed: u64 = rows.iter().filter_map(|r| r["allow"].as_u64()).sum();
        (deny["deny"].as_u64()? >= 2 && allowed >= 3).then_some(v)
    });
    let rows = view["authz"].as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["service"] == "product-catalog"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .filter(|r| r["policy"] == "default/no-admin")
            .all(|r| r["allow"] == 0 && r["rule"] == 1),
        "only rule 1 denied, and the Deny policy allowed nothing: {rows:?}"
    );

    // Explain by the id the access log carries (both sidecars log to it: the client's
    // outbound line is taken), its request replayed at the client's proxy.
    let node = client_node(&cp);
    let log_path = log.to_str().unwrap();
    wait_for(Duration::from_secs(10), "the access log line", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("deny-me-1")
            .then_some(())
    });
    let (code, out, err) = cp.cli(&[
        "explain",
        "--proxy",
        &node,
        "--request-id",
        "deny-me-1",
        "--access-log",
        log_path,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["outcome"], "denied", "{v:#}");
    assert_eq!(v["authorization"]["decidedBy"], "default/no-admin", "{v:#}");
    assert_eq!(v["authorization"]["policies"][0]["matchedRule"], 1, "{v:#}");
    assert_eq!(v["accessLog"]["status"], 403, "{v:#}");
    assert_eq!(v["accessLog"]["direction"], "outbound", "{v:#}");
    // Text too, naming what the log could not say.
    let (code, out, err) = cp.cli(&[
        "explain",
        "--proxy",
        &node,
        "--request-id",
        "deny-me-1",
        "--access-log",
        log_path,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("access log") && out.contains("request headers"),
        "{out}"
    );
    // An id the log does not have is a clear error.
    let (code, out, err) = cp.cli(&[
        "explain",
        "--proxy",
        &node,
        "--request-id",
        "no-such-id",
        "--access-log",
        log_path,
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("\"no-such-id\"") && err.contains(log_path),
        "{err}"
    );
}

#[test]
fn an_instance_answering_5xx_shows_ejected_with_its_reason_until_the_ejection_ends() {
    let dir = TempDir::new("service-outlier");
    let cp = ControlPlane::start_in(dir.path());
    let _good = catalog_env(
        dir.path(),
        "good",
        &cp.url(),
        free_port(),
        "v1",
        &token(&cp, "product-catalog"),
        &["--ttl", "2s"],
        &[],
    );
    let _bad = catalog_env(
        dir.path(),
        "bad",
        &cp.url(),
        free_port(),
        "bad",
        &token(&cp, "product-catalog"),
        &["--ttl", "2s"],
        &[("FAIL_STATUS", "500")],
    );
    let up = free_port();
    let _client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    let config = dir.write(
        "policy.yaml",
        r#"
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: catalog}
spec:
  targetRef: {kind: Service, name: product-catalog}
  loadBalancer: {algorithm: RoundRobin}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 3s, maxEjectionPercent: 50}
"#,
    );
    let (code, out, err) = cp.cli(&["apply", "-f", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // Both instances registered.
    let (bad, good) = wait_for(READY, "both instances to register", || {
        let (code, out, _) = cp.cli(&["get", "workloads", "-o", "json"]);
        let workloads: Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
        let items = workloads["items"].as_array().or(workloads.as_array())?;
        let address = |version: &str| {
            items
                .iter()
                .find(|w| w["labels"]["version"] == version && w["healthy"] == true)
                .and_then(|w| w["address"].as_str())
                .map(String::from)
        };
        Some((address("bad")?, address("v1")?))
    });

    // Traffic until the client's sidecar ejects it and the control plane says so.
    let row = wait_for(
        Duration::from_secs(30),
        "the ejection in the service API",
        || {
            let _ = versions(up, 6);
            let v = catalog_view(&cp);
            v["instances"]
                .as_array()?
                .iter()
                .find(|i| i["address"] == bad.as_str() && i["ejectedBy"] == 1)
                .cloned()
        },
    );
    // The proxies whose view holds the backend: the client's, and the catalog sidecars'
    // (`trellis run` routes its app's HTTP proxy traffic, so it holds every service).
    assert_eq!(row["callers"], 3, "{row:#}");
    assert_eq!(row["reasons"][0], "3 consecutive 5xx", "{row:#}");
    assert!(row["ejectedUntilUnixMs"].as_i64().is_some(), "{row:#}");
    assert!(
        row["summary"]
            .as_str()
            .unwrap()
            .starts_with("ejected by 1 of 3 callers, reason: 3 consecutive 5xx"),
        "{row:#}"
    );
    assert!(
        row["backends"][0]
            .as_str()
            .unwrap()
            .starts_with("default/product-catalog:"),
        "{row:#}"
    );
    let v = catalog_view(&cp);
    assert!(
        !v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["address"] == good.as_str()),
        "the healthy instance is not listed: {v:#}"
    );

    // No more traffic: the 3 s ejection ends, and the view says it is no longer ejected.
    wait_for(
        Duration::from_secs(15),
        "the ejection to end in the service API",
        || {
            let v = catalog_view(&cp);
            let rows = v["instances"].as_array()?;
            rows.iter()
                .all(|i| i["address"] != bad.as_str() || i["ejectedBy"] == 0)
                .then_some(())
        },
    );
}
