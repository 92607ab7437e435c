//! The mesh end to end with real processes on loopback: `trellis control`, apps under
//! `trellis run` (the demo's product-catalog), client sidecars, the CLI, and a real etcd.

mod support;

use std::time::Duration;
use support::*;

const ROUTE_ALL_V2: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  ports: [{port: 80}]
  selector: {app: product-catalog, version: v1}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec:
  ports: [{port: 80}]
  selector: {app: product-catalog, version: v2}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-split}
spec:
  parentRefs: [{group: "", kind: Service, name: product-catalog}]
  rules:
    - backendRefs:
        - {name: catalog-v1, port: 80, weight: 0}
        - {name: catalog-v2, port: 80, weight: 100}
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: x-route, value: catalog-split}]
"#;

#[test]
fn routes_and_instances_follow_the_control_plane() {
    let dir = TempDir::new("follow");
    let SmallMesh {
        cp,
        up,
        catalog: _catalog,
        client: _client,
    } = small_mesh(&dir);

    // A new instance joins rotation.
    let mut v2 = catalog(dir.path(), &cp.url(), "v2", &token(&cp, "product-catalog"));
    let t = wait_versions(up, &["v1", "v2"], READY);
    eprintln!("v2 in rotation after {t:?}");

    // A route sends everything to v2, within a bounded time after `apply` returns.
    let route = dir.write("route.yaml", ROUTE_ALL_V2);
    let (code, out, err) = cp.cli(&["apply", "-f", route.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("HTTPRoute default/catalog-split created"),
        "{out}"
    );
    let t = wait_versions(up, &["v2"], READY);
    eprintln!("route followed {t:?} after apply");
    let r = get(up, "/products/1").unwrap();
    assert_eq!(
        r.headers.get("x-route").map(String::as_str),
        Some("catalog-split")
    );
    let (code, out, _) = cp.cli(&["get", "httproutes"]);
    assert_eq!(code, 0);
    assert!(out.contains("catalog-split"), "{out}");

    // Deleting it restores the even split.
    let (code, out, err) = cp.cli(&["delete", "-f", route.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_versions(up, &["v1", "v2"], READY);

    // The app exits: its sidecar deregisters it and exits too.
    let app = children(v2.pid());
    assert_eq!(app.len(), 1, "trellis run has one child, the app");
    signal(app[0], "KILL");
    wait_for(READY, "trellis run to exit with its app", || {
        v2.exited().then_some(())
    });
    let t = wait_versions(up, &["v1"], READY);
    eprintln!("exited app out of rotation after {t:?}");

    // A sidecar that vanishes without a word leaves when its 2 s lease lapses.
    let mut v2 = catalog(dir.path(), &cp.url(), "v2", &token(&cp, "product-catalog"));
    wait_versions(up, &["v1", "v2"], READY);
    v2.kill_hard();
    // Requests never fail meanwhile (a refused connection is retried on another endpoint),
    // and the registry drops the instance when its lease lapses.
    let start = std::time::Instant::now();
    wait_for(READY, "the lease to lapse", || {
        let (_, out, _) = cp.cli(&["get", "workloads"]);
        (out.matches("version=").count() == 1).then_some(())
    });
    eprintln!("vanished sidecar deregistered after {:?}", start.elapsed());
    assert_eq!(versions(up, 20).get("v1"), Some(&20));
}

#[test]
fn http_proxy_mode_routes_by_host_and_unhealthy_instances_get_no_traffic() {
    let dir = TempDir::new("proxy-mode");
    let cp = ControlPlane::start_in(dir.path());
    let _v1 = catalog(dir.path(), &cp.url(), "v1", &token(&cp, "product-catalog"));
    // An instance whose health check fails: registered, but never in rotation.
    let mut cmd = trellis();
    cmd.args([
        "run",
        "--control",
        &cp.url(),
        "--service",
        "product-catalog",
        "--port",
        &free_port().to_string(),
        "--label",
        "version=sick",
        "--health",
        "http:/no-such-page",
        "--token",
        &token(&cp, "product-catalog"),
        "--state-dir",
    ])
    .arg(dir.path().join("sick-state"))
    .args(["--", bin(), "demo-app", "product-catalog"])
    .env("DEMO_VERSION", "sick");
    let _sick = Proc::spawn("sick", dir.path(), cmd);
    // A client app that records the HTTP_PROXY `trellis run` gives it.
    let env_file = dir.path().join("proxy.env");
    let mut cmd = trellis();
    cmd.args([
        "run",
        "--control",
        &cp.url(),
        "--token",
        &token(&cp, "client"),
        "--state-dir",
    ])
    .arg(dir.path().join("client-state"))
    .args([
        "--",
        "sh",
        "-c",
        &format!("echo $HTTP_PROXY > {}; exec sleep 600", env_file.display()),
    ]);
    let client = Proc::spawn("client", dir.path(), cmd);
    let proxy = wait_for(READY, "the app to see HTTP_PROXY", || {
        std::fs::read_to_string(&env_file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    let port: u16 = proxy.trim().rsplit(':').next().unwrap().parse().unwrap();
    wait_for(READY, "both instances registered, one unhealthy", || {
        let (_, out, _) = cp.cli(&["get", "workloads"]);
        let lines = || out.lines();
        (lines().any(|l| l.contains("false") && l.contains("version=sick"))
            && lines().any(|l| l.contains("true") && l.contains("version=v1")))
        .then_some(())
    });
    // Readiness, not a guess: the client's sidecar has applied the healthy instance.
    wait_endpoints(admin_port(&client), "product-catalog", 1);
    // Absolute-form requests through the sidecar's HTTP proxy port are routed by Host, and
    // only the healthy instance answers.
    let mut seen = std::collections::BTreeMap::new();
    wait_for(READY, "the route by Host", || {
        get(port, "http://product-catalog/products/1")
            .ok()
            .filter(|r| r.status == 200)
    });
    for _ in 0..20 {
        let r = get(port, "http://product-catalog/products/1").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        *seen.entry(r.headers["x-demo-version"].clone()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("v1"), Some(&20), "{seen:?}");
    let r = get(port, "http://no-such-service/").unwrap();
    assert!(r.status >= 400, "{r:?}");
}

#[test]
fn proxies_survive_a_control_plane_outage_and_boot_from_their_persisted_config() {
    let dir = TempDir::new("outage");
    let store = dir.path().join("store").display().to_string();
    let port = free_port();
    let mut cp = ControlPlane::start("control", dir.path(), port, &store);
    let url = cp.url();
    let _v1 = catalog(dir.path(), &url, "v1", &token(&cp, "product-catalog"));
    let up = free_port();
    let client_token = token(&cp, "client");
    let mut client1 = client(dir.path(), &url, up, "client-state", &client_token);
    wait_versions(up, &["v1"], READY);

    // Acknowledged config survives a crash of the control plane.
    let svc = dir.write(
        "svc.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: billing}\nspec:\n  ports: [{port: 80}]\n",
    );
    let (code, _, err) = cp.cli(&["apply", "-f", svc.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    // The control plane crashes: traffic continues.
    cp.proc.kill_hard();
    assert_eq!(versions(up, 20).get("v1"), Some(&20));

    // A restarted sidecar boots from its persisted config while the control plane is down.
    client1.stop(Duration::from_secs(10));
    let client2 = client(dir.path(), &url, up, "client-state", &client_token);
    // Ready, serving the persisted config (a loaded machine can take seconds to get here).
    wait_endpoints(admin_port(&client2), "product-catalog", 1);
    wait_versions(up, &["v1"], READY);
    assert!(
        wait_for(READY, "the boot log", || {
            let log = client2.log_text();
            log.contains("booted from the persisted config")
                .then_some(log)
        })
        .contains("control plane unreachable")
    );

    // The control plane returns with everything it acknowledged (the instance is still
    // registered), the proxies reconnect, and new config reaches them.
    let cp = ControlPlane::start("control-2", dir.path(), port, &store);
    wait_for(READY, "both sidecars to reconnect", || {
        let (_, out, _) = cp.cli(&["get", "proxies"]);
        (out.matches("in sync").count() == 2).then_some(())
    });
    // Registered: kept through the restart, or registered again by its sidecar (its 2 s
    // lease can lapse before a slow machine lets the sidecar's heartbeat through).
    wait_for(READY, "the instance to be registered", || {
        let (_, out, _) = cp.cli(&["get", "workloads"]);
        out.contains("version=v1").then_some(())
    });
    let (_, out, _) = cp.cli(&["get", "services"]);
    assert!(
        out.contains("billing"),
        "the applied Service survived kill -9: {out}"
    );
    let route = dir.write(
        "route.yaml",
        &ROUTE_ALL_V2.replace("weight: 0}", "weight: 100}").replace(
            "{name: catalog-v2, port: 80, weight: 100}",
            "{name: catalog-v2, port: 80, weight: 0}",
        ),
    );
    let (code, out, err) = cp.cli(&["apply", "-f", route.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for(READY, "the route to reach the restarted sidecar", || {
        get(up, "/products/1")
            .ok()
            .filter(|r| r.headers.contains_key("x-route"))
    });
    drop(client2);
}

#[test]
fn bad_config_is_rejected_whole_and_a_nack_is_reported() {
    let dir = TempDir::new("reject");
    let cp = ControlPlane::start_in(dir.path());
    let bad = dir.write(
        "bad.yaml",
        r#"apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: good}
spec:
  ports: [{port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken}
spec:
  parentRefs: [{group: "", kind: Service, name: good}]
  rules:
    - backendRefs:
        - name: good
          port: 81
"#,
    );
    let (code, out, err) = cp.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("bad.yaml:15: spec.rules[0].backendRefs[0].port: Service good has no port 81"),
        "{err}"
    );
    // All or nothing: the valid Service in the same apply was not stored either.
    let (_, out, _) = cp.cli(&["get", "services"]);
    assert!(out.contains("No resources found"), "{out}");

    // Optimistic concurrency: a stale resourceVersion is refused.
    let good = dir.write(
        "good.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: billing}\nspec:\n  ports: [{port: 8080}]\n",
    );
    let (code, out, err) = cp.cli(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Service default/billing created"), "{out}");
    let (code, out, _) = cp.cli(&["apply", "-f", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("unchanged"), "{out}");
    let (_, yaml, _) = cp.cli(&["get", "service", "billing", "-o", "yaml"]);
    assert!(yaml.contains("resourceVersion"), "{yaml}");
    let edited = dir.write("edited.yaml", &yaml.replace("8080", "8081"));
    let (code, out, _) = cp.cli(&[
        "apply",
        "-f",
        dir.write(
            "v2.yaml",
            &std::fs::read_to_string(&good)
                .unwrap()
                .replace("8080", "8082"),
        )
        .to_str()
        .unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("configured"), "{out}");
    let (code, _, err) = cp.cli(&["apply", "-f", edited.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("stale"), "{err}");

    // A proxy whose local listener needs billing:8080 refuses a view where billing has no
    // such port: it NACKs, keeps its config, and `get proxies` shows its reason.
    let local = dir.write(
        "local.yaml",
        &format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: edge}}\nspec:\n  admin: {{address: 127.0.0.1:{}}}\n  outbound:\n    - {{name: billing, address: 127.0.0.1:{}, service: {{name: billing, port: 8080}}}}\n",
            free_port(),
            free_port()
        ),
    );
    let mut cmd = trellis();
    cmd.args([
        "proxy",
        "--control",
        &cp.url(),
        "--config",
        local.to_str().unwrap(),
        "--node-id",
        "edge-1",
        "--token",
        &token(&cp, "edge"),
        "--state-dir",
    ])
    .arg(dir.path().join("edge-state"));
    let _edge = Proc::spawn("edge", dir.path(), cmd);
    let nack = wait_for(READY, "the NACK to show", || {
        let (_, out, _) = cp.cli(&["get", "proxies", "edge-1", "-o", "json"]);
        out.contains("\"nack\"").then_some(out)
    });
    assert!(nack.contains("Service billing has no port 8080"), "{nack}");
    let (_, table, _) = cp.cli(&["get", "proxies"]);
    assert!(table.contains("NACK"), "{table}");

    // Fixing the service clears it.
    let fixed = dir.write("fixed.yaml", &std::fs::read_to_string(&good).unwrap());
    let (code, _, err) = cp.cli(&["apply", "-f", fixed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    wait_for(READY, "the proxy to accept", || {
        let (_, out, _) = cp.cli(&["get", "proxies", "edge-1", "-o", "json"]);
        (!out.contains("\"nack\"") && out.contains("edge-1")).then_some(())
    });
}

#[cfg(feature = "etcd")]
#[path = "../../control/tests/support/etcd.rs"]
mod etcd;

#[cfg(feature = "etcd")]
#[test]
fn two_replicas_on_etcd_serve_the_same_state_and_proxies_move_to_the_survivor() {
    let dir = TempDir::new("replicas");
    let etcd = etcd::Etcd::start();
    let store = format!(
        "etcd://{}/mesh-test",
        etcd.endpoint.trim_start_matches("http://")
    );
    let mut a = ControlPlane::start("control-a", dir.path(), free_port(), &store);
    let b = ControlPlane::start("control-b", dir.path(), free_port(), &store);
    let both = format!("{},{}", a.url(), b.url());

    // A write through one replica is read through the other.
    let svc = dir.write(
        "svc.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: billing}\nspec:\n  ports: [{port: 80}]\n",
    );
    let (code, _, err) = a.cli(&["apply", "-f", svc.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    wait_for(READY, "replica b to see the write", || {
        let (_, out, _) = b.cli(&["get", "services"]);
        out.contains("billing").then_some(())
    });

    // Instances and a client sidecar know both replicas; they start on the first (a).
    let _v1 = catalog(dir.path(), &both, "v1", &token(&a, "product-catalog"));
    let _v2 = catalog(dir.path(), &both, "v2", &token(&a, "product-catalog"));
    let up = free_port();
    let _client = client(dir.path(), &both, up, "client-state", &token(&a, "client"));
    wait_versions(up, &["v1", "v2"], READY);
    wait_for(READY, "the sidecars to connect to replica a", || {
        let (_, out, _) = a.cli(&["get", "proxies"]);
        (out.matches("in sync").count() == 3).then_some(())
    });
    let (_, out, _) = b.cli(&["get", "workloads"]);
    assert_eq!(
        out.matches("version=").count(),
        2,
        "b sees a's registrations: {out}"
    );

    // Replica a dies: the sidecars move to b, and config applied through b reaches them.
    a.proc.kill_hard();
    wait_for(READY, "the sidecars to move to replica b", || {
        let (_, out, _) = b.cli(&["get", "proxies"]);
        (out.matches("in sync").count() == 3).then_some(())
    });
    let route = dir.write("route.yaml", ROUTE_ALL_V2);
    let (code, out, err) = b.cli(&["apply", "-f", route.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_versions(up, &["v2"], READY);
    // Registrations made through a keep their leases through b.
    std::thread::sleep(Duration::from_secs(3));
    let (_, out, _) = b.cli(&["get", "workloads"]);
    assert_eq!(out.matches("version=").count(), 2, "{out}");
}

#[test]
fn demo_starts_serves_traffic_through_sidecars_and_stops_cleanly() {
    let dir = TempDir::new("demo");
    let out = dir.path().join("demo.out");
    let mut cmd = trellis();
    cmd.args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "50",
        "--data-dir",
    ])
    .arg(dir.path().join("data"));
    let log = std::fs::File::create(&out).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    let mut demo = Proc {
        name: "demo".into(),
        child: cmd.spawn().unwrap(),
        log: out.clone(),
    };
    // The load generator reports orders that went through order-processing's sidecar to
    // catalog, inventory and payment sidecars.
    let line = wait_for(READY, "a load-generator summary with orders", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.lines()
            .find(|l| {
                l.starts_with("load-generator:") && l.contains("201×") && l.contains("catalog v")
            })
            .map(String::from)
    });
    eprintln!("{line}");
    let text = std::fs::read_to_string(&out).unwrap();
    let control = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("control plane")
                .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        })
        .expect("the banner names the control plane");
    let (code, workloads, _) = cli(
        &control,
        &dir.path().join("data/admin-token"),
        &["get", "workloads"],
    );
    assert_eq!(code, 0);
    for svc in [
        "product-catalog",
        "order-processing",
        "inventory",
        "payment",
    ] {
        assert!(workloads.contains(svc), "{svc} registered: {workloads}");
    }
    // Every sidecar acknowledges the current config. The demo's canary keeps changing it and
    // a sidecar may still be starting on a loaded machine: wait for all six, bounded.
    let mut last = String::new();
    let all_in_sync = (0..60).any(|_| {
        let (_, proxies, _) = cli(
            &control,
            &dir.path().join("data/admin-token"),
            &["get", "proxies"],
        );
        last = proxies;
        let done = last.matches("in sync").count() == 6;
        if !done {
            std::thread::sleep(Duration::from_millis(500));
        }
        done
    });
    assert!(all_in_sync, "6 sidecars in sync within 30 s: {last}");

    // Ctrl-C stops everything and leaves no process behind.
    let all = tree(demo.pid());
    assert!(all.len() >= 13, "demo, 6 sidecars and their apps: {all:?}");
    signal(demo.pid(), "INT");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(s)) = demo.child.try_wait() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let left: Vec<String> = all
                .iter()
                .filter(|p| alive(**p))
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ")
                })
                .collect();
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!(
                "the demo did not stop in 30 s; still running: {left:#?}\nlast output:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let left: Vec<u32> = all.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(
        std::fs::read_to_string(&out)
            .unwrap()
            .contains("demo: stopped")
    );
}

/// A v1 catalog under `trellis run` with an identity (JSON logs, for its admin port).
fn mtls_catalog(cp: &ControlPlane, dir: &std::path::Path) -> Proc {
    let cat_token = token(cp, "product-catalog");
    let cat_port = free_port().to_string();
    run(
        dir,
        "catalog",
        &[
            "--control",
            &cp.url(),
            "--service",
            "product-catalog",
            "--port",
            &cat_port,
            "--health",
            "http:/healthz",
            "--token",
            &cat_token,
        ],
        &[bin(), "demo-app", "product-catalog"],
        &[("DEMO_VERSION", "v1")],
    )
}

/// A v1 catalog and a client sidecar (upstream port returned), both with identities.
fn mtls_catalog_and_client(cp: &ControlPlane, dir: &std::path::Path) -> (Proc, Proc, u16) {
    let url = cp.url();
    let client_token = token(cp, "client");
    let catalog = mtls_catalog(cp, dir);
    let up = free_port();
    let up_arg = format!("product-catalog={up}");
    let client = run(
        dir,
        "client",
        &[
            "--control",
            &url,
            "--upstream",
            &up_arg,
            "--token",
            &client_token,
        ],
        &["sleep", "600"],
        &[],
    );
    (catalog, client, up)
}

#[test]
fn sidecars_use_mutual_tls_and_strict_mode_refuses_plaintext() {
    let dir = TempDir::new("mtls");
    let cp = ControlPlane::start_in(dir.path());
    let url = cp.url();
    let (catalog, _client, up) = mtls_catalog_and_client(&cp, dir.path());
    wait_versions(up, &["v1"], READY);

    // Registered with their SPIFFE ids; the catalog's sidecar saw mutual TLS.
    let (_, workloads, _) = cp.cli(&["get", "workloads", "-o", "json"]);
    assert!(
        workloads.contains("spiffe://trellis.local/ns/default/sa/product-catalog"),
        "{workloads}"
    );
    let admin = admin_port(&catalog);
    assert!(
        metric(
            admin,
            "trellis_inbound_connections_total{listener=\"inbound\",security=\"mtls\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            admin,
            "trellis_identity_certificate_expiry_timestamp_seconds"
        )
        .unwrap()
            > 1.0e9
    );
    let inbound: String = workloads
        .lines()
        .find(|l| l.contains("\"address\""))
        .and_then(|l| l.split('"').nth(3))
        .map(String::from)
        .unwrap();
    let inbound_port: u16 = inbound.rsplit(':').next().unwrap().parse().unwrap();

    // Permissive (the default): a plaintext client of the inbound port is served.
    assert_eq!(get(inbound_port, "/products/1").unwrap().status, 200);

    // Strict: plaintext is refused (the connection is closed), mesh traffic flows.
    let strict = dir.write(
        "strict.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  mtls: {mode: Strict}\n",
    );
    let (code, _, err) = cp.cli(&["apply", "-f", strict.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    wait_for(READY, "plaintext to be refused", || {
        get(inbound_port, "/products/1").is_err().then_some(())
    });
    assert!(
        metric(
            admin,
            "trellis_inbound_connections_total{listener=\"inbound\",security=\"refused_plaintext\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(versions(up, 10).get("v1"), Some(&10));

    // A sidecar without an identity cannot reach a strict service.
    let up2 = free_port();
    let up2_arg = format!("product-catalog={up2}");
    let anon = run(
        dir.path(),
        "anonymous",
        &[
            "--control",
            &url,
            "--upstream",
            &up2_arg,
            "--ca-file",
            cp.ca().to_str().unwrap(),
        ],
        &["sleep", "600"],
        &[],
    );
    // A sidecar without credentials learns nothing from the control plane: its upstream
    // stays unknown (503), and the refusal is in its log.
    let r = wait_for(READY, "the anonymous sidecar to answer", || {
        get(up2, "/products/1").ok()
    });
    assert_eq!(r.status, 503, "{r:?}");
    wait_for(READY, "the refusal in its log", || {
        anon.log_text()
            .contains("proxies must present a join token")
            .then_some(())
    });
    let (_, proxies, _) = cp.cli(&["get", "proxies"]);
    let anon_node = format!("sleep-{}", anon.pid());
    assert!(!proxies.contains(&anon_node), "{proxies}");
}

#[test]
fn certificates_rotate_under_load_without_failing_a_request() {
    let dir = TempDir::new("rotate");
    let port = free_port();
    let mut cmd = trellis();
    cmd.args([
        "control",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store",
    ])
    .arg(dir.path().join("store"))
    .args(["--cert-ttl", "3s"]);
    let mut proc = Proc::spawn("control", dir.path(), cmd);
    wait_for(READY, "the control plane", || {
        assert!(!proc.exited(), "{}", proc.log_text());
        https("GET", port, "/live", "", &dir.path().join("store/ca.pem"))
            .ok()
            .filter(|r| r.status == 200)
    });
    let cp = ControlPlane {
        proc,
        port,
        // The default place: the store directory.
        token: dir.path().join("store/admin-token"),
    };
    let strict = dir.write(
        "strict.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  mtls: {mode: Strict}\n",
    );
    assert_eq!(cp.cli(&["apply", "-f", strict.to_str().unwrap()]).0, 0);
    let (catalog, client, up) = mtls_catalog_and_client(&cp, dir.path());
    // Setup only: with 3-second certificates the first mutual TLS path can take longer than
    // usual on a loaded 2-core CI machine (seen once at over 20 s).
    wait_versions(up, &["v1"], READY);
    let cat_admin = admin_port(&catalog);
    let client_admin = admin_port(&client);
    let expiry = |admin| {
        metric(
            admin,
            "trellis_identity_certificate_expiry_timestamp_seconds",
        )
        .unwrap_or(0.0)
    };
    let (cat_first, client_first) = (expiry(cat_admin), expiry(client_admin));

    // 8 s of load from 4 clients (each request on a new client connection; the sidecars
    // open new mutual TLS connections as their pools turn over) across about four
    // rotations of both certificates.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                while std::time::Instant::now() < deadline {
                    match get(up, "/products/1") {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.join().unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} requests");
    assert!(
        expiry(cat_admin) >= cat_first + 2.0,
        "the catalog's certificate rotated"
    );
    assert!(
        expiry(client_admin) >= client_first + 2.0,
        "the client's certificate rotated"
    );
    eprintln!("{total} requests, 0 failed, across certificate rotations");
}

#[test]
fn authorization_by_identity_path_and_method_at_the_receiving_sidecar() {
    let dir = TempDir::new("authz");
    let cp = ControlPlane::start_in(dir.path());
    let url = cp.url();
    let catalog = mtls_catalog(&cp, dir.path());
    // Two callers with their own identities.
    let mut ports = Vec::new();
    let mut callers = Vec::new();
    for name in ["orders", "intruder"] {
        let t = token(&cp, name);
        let up = free_port();
        let arg = format!("product-catalog={up}");
        callers.push(run(
            dir.path(),
            name,
            &["--control", &url, "--upstream", &arg, "--token", &t],
            &["sleep", "600"],
            &[],
        ));
        ports.push(up);
    }
    let (orders, intruder) = (ports[0], ports[1]);
    wait_versions(orders, &["v1"], READY);
    wait_versions(intruder, &["v1"], READY);

    let policy = dir.write(
        "authz.yaml",
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: catalog-readers}
spec:
  targetRef: {kind: Service, name: product-catalog}
  action: Allow
  rules:
    - from: {identities: [spiffe://trellis.local/ns/default/sa/orders]}
      to: {paths: [/products/*], methods: [GET]}
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: hide-product-2}
spec:
  targetRef: {kind: Service, name: product-catalog}
  action: Deny
  rules:
    - to: {paths: [/products/2]}
",
    );
    let (code, out, err) = cp.cli(&["apply", "-f", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let denied = wait_for(READY, "the intruder to be denied", || {
        get(intruder, "/products/1")
            .ok()
            .filter(|r| r.status == 403)
    });
    // A remote caller learns that it was denied, not by which policy.
    assert_eq!(denied.headers["trellis-proxy-error"], "denied");
    assert_eq!(get(orders, "/products/1").unwrap().status, 200);
    let r = http("POST", orders, "/products/1", "{}").unwrap();
    assert_eq!(r.status, 403, "POST is not allowed");
    let r = get(orders, "/products/2").unwrap();
    assert_eq!(
        (r.status, r.headers["trellis-proxy-error"].as_str()),
        (403, "denied")
    );

    // The Deny policy in audit mode: allowed again, counted as an audited denial.
    let audit = dir.write(
        "audit.yaml",
        &std::fs::read_to_string(&policy)
            .unwrap()
            .replace("  action: Deny\n", "  action: Deny\n  mode: Audit\n"),
    );
    assert_eq!(cp.cli(&["apply", "-f", audit.to_str().unwrap()]).0, 0);
    wait_for(READY, "audit mode", || {
        get(orders, "/products/2").ok().filter(|r| r.status == 200)
    });
    let admin = admin_port(&catalog);
    assert!(
        metric(admin, "trellis_authz_decisions_total{listener=\"inbound\",decision=\"audit_deny\",policy=\"default/hide-product-2\"}").unwrap_or(0.0) >= 1.0
    );
    drop(callers);
}

#[test]
fn the_config_api_refuses_clients_without_the_admin_token() {
    let dir = TempDir::new("auth");
    let cp = ControlPlane::start_in(dir.path());
    let token = std::fs::read_to_string(&cp.token).unwrap();
    assert_eq!(token.trim().len(), 64, "a 256-bit token, hex");
    // Raw HTTP without a token: nothing can be read, changed, or tokens created.
    for (method, path, body) in [
        ("GET", "/v1/resources/services", ""),
        ("GET", "/v1/resources/proxies", ""),
        ("POST", "/v1/apply", r#"{"files":[]}"#),
        ("POST", "/v1/delete", r#"{"keys":[]}"#),
        ("POST", "/v1/tokens", r#"{"service":"x"}"#),
    ] {
        let r = cp.https(method, path, body).unwrap();
        assert_eq!(r.status, 401, "{method} {path}: {r:?}");
    }
    // A wrong token is refused the same way, through the CLI too.
    let wrong = dir.write("wrong-token", &"0".repeat(64));
    let (code, _, err) = cli(&cp.url(), &wrong, &["get", "services"]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong admin token"), "{err}");
    let (code, _, err) = cli(
        &cp.url(),
        &dir.path().join("missing"),
        &["token", "create", "--service", "x"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("admin token"), "{err}");
    // The right one works; the public trust bundle needs none.
    assert_eq!(cp.cli(&["get", "services"]).0, 0);
    assert_eq!(cp.https("GET", "/v1/trust", "").unwrap().status, 200);
    // A restart keeps the same token (it is not regenerated).
    drop(cp);
}

#[test]
fn a_user_provided_ca_signs_the_workload_certificates() {
    let dir = TempDir::new("own-ca");
    let m = trellis_identity::Ca::generate("corp.example", Duration::from_secs(86400)).unwrap();
    let cert = dir.write("ca.pem", &m.cert_pem);
    let key = dir.write("ca.key", &m.key_pem);
    // A key others can read is refused, with the path and the fix.
    let (code, _, err) = {
        let out = trellis()
            .args([
                "control",
                "--listen",
                "127.0.0.1:0",
                "--trust-domain",
                "corp.example",
                "--store",
            ])
            .arg(dir.path().join("store"))
            .arg("--ca-cert")
            .arg(&cert)
            .arg("--ca-key")
            .arg(&key)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ca.key") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = free_port();
    let mut cmd = trellis();
    cmd.args([
        "control",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--trust-domain",
        "corp.example",
        "--store",
    ])
    .arg(dir.path().join("store"))
    .arg("--ca-cert")
    .arg(&cert)
    .arg("--ca-key")
    .arg(&key);
    let mut proc = Proc::spawn("control", dir.path(), cmd);
    wait_for(READY, "the control plane", || {
        assert!(!proc.exited(), "{}", proc.log_text());
        https(
            "GET",
            port,
            "/v1/trust",
            "",
            &dir.path().join("store/ca.pem"),
        )
        .ok()
        .filter(|r| r.status == 200)
    });
    let cp = ControlPlane {
        proc,
        port,
        token: dir.path().join("store/admin-token"),
    };
    // The published bundle is the user's root; its key is nowhere in the answer.
    let trust = cp.https("GET", "/v1/trust", "").unwrap().body;
    assert!(trust.contains("corp.example"), "{trust}");
    let bundle: serde_json::Value = serde_json::from_str(&trust).unwrap();
    assert_eq!(bundle["bundlePem"].as_str().unwrap(), m.cert_pem);
    assert!(!trust.contains("PRIVATE KEY"));
    // A sidecar gets its identity from it.
    let _v1 = catalog(dir.path(), &cp.url(), "v1", &token(&cp, "product-catalog"));
    let up = free_port();
    let _client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    wait_versions(up, &["v1"], READY);
    let (_, workloads, _) = cp.cli(&["get", "workloads", "-o", "json"]);
    assert!(
        workloads.contains("spiffe://corp.example/ns/default/sa/product-catalog"),
        "{workloads}"
    );
}

#[test]
fn the_control_channel_is_verified_and_credentials_stay_off_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("channel");
    let cp = ControlPlane::start_in(dir.path());
    let other = TempDir::new("impostor");
    let impostor = ControlPlane::start_in(other.path());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("store")), 0o700);
    assert_eq!(mode(&dir.path().join("store/trellis.redb")), 0o600);
    assert_eq!(mode(&cp.token), 0o600);

    // Plaintext needs --insecure; an impostor fails the CLI's check against ca.pem.
    let plain = cp.url().replace("https://", "http://");
    let (code, _, err) = cli(&plain, &cp.token, &["get", "services"]);
    assert_ne!(code, 0);
    assert!(err.contains("--insecure"), "{err}");
    let (code, _, err) = cli(&impostor.url(), &cp.token, &["get", "services"]);
    assert_ne!(code, 0);
    assert!(err.contains("not issued by the trusted mesh CA"), "{err}");

    // A token in a file others can read is refused; an owner-only one works.
    let catalog_token = token(&cp, "product-catalog");
    assert!(catalog_token.starts_with("trellis1."), "{catalog_token}");
    let file = dir.write("catalog.token", &catalog_token);
    let args = |state: &str| {
        let mut cmd = trellis();
        cmd.args(["--log-format", "json", "run", "--control", &cp.url()])
            .args([
                "--service",
                "product-catalog",
                "--port",
                &free_port().to_string(),
            ])
            .arg("--token-file")
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join(state))
            .args(["--", bin(), "demo-app", "product-catalog"]);
        cmd
    };
    let out = args("state-open").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("catalog.token") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _catalog = Proc::spawn("catalog", dir.path(), args("state-1"));
    wait_for(READY, "the catalog to register", || {
        let (_, out, _) = cp.cli(&["get", "workloads", "-o", "json"]);
        out.contains("spiffe://trellis.local/ns/default/sa/product-catalog")
            .then_some(())
    });
    let state = dir.path().join("state-1");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("identity.json")), 0o600);
    wait_for(READY, "the persisted config", || {
        state.join("snapshot.json").exists().then_some(())
    });
    assert_eq!(mode(&state.join("snapshot.json")), 0o600);
    // A sidecar refuses a state directory whose key others can read.
    std::fs::set_permissions(
        state.join("identity.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut open = Proc::spawn("open-state", dir.path(), args("state-1"));
    let log = wait_for(READY, "the open state to be refused", || {
        open.exited().then(|| open.log_text())
    });
    assert!(
        log.contains("identity.json") && log.contains("chmod 600"),
        "{log}"
    );
    std::fs::set_permissions(
        state.join("identity.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    // The token was single-use: a second sidecar with it gets no identity.
    let mut second = Proc::spawn("second", dir.path(), args("state-2"));
    let log = wait_for(READY, "the second sidecar to give up", || {
        second.exited().then(|| second.log_text())
    });
    assert!(log.contains("already used"), "{log}");

    // A sidecar whose token pins the real CA refuses the impostor before sending it.
    let fresh = token(&cp, "payment");
    let mut fooled = trellis();
    fooled
        .args(["run", "--control", &impostor.url(), "--service", "payment"])
        .args(["--port", &free_port().to_string(), "--state-dir"])
        .arg(dir.path().join("state-3"))
        .args(["--", "sleep", "600"])
        .env("TRELLIS_TOKEN", &fresh);
    let mut fooled = Proc::spawn("fooled", dir.path(), fooled);
    let log = wait_for(READY, "the sidecar to refuse", || {
        fooled.exited().then(|| fooled.log_text())
    });
    assert!(
        log.contains("untrusted control plane") && log.contains("pinned by the join token"),
        "{log}"
    );
    // The real control plane still takes that token: the impostor never saw it.
    let mut payment = trellis();
    payment
        .args(["run", "--control", &cp.url(), "--service", "payment"])
        .args(["--port", &free_port().to_string(), "--state-dir"])
        .arg(dir.path().join("state-4"))
        .args(["--", "sleep", "600"])
        .env("TRELLIS_TOKEN", &fresh);
    let _payment = Proc::spawn("payment", dir.path(), payment);
    wait_for(READY, "payment to register", || {
        let (_, out, _) = cp.cli(&["get", "workloads", "-o", "json"]);
        out.contains("sa/payment").then_some(())
    });
}

#[test]
fn trellis_run_takes_its_inbound_protocol_from_the_service() {
    let dir = TempDir::new("app-protocol");
    let cp = ControlPlane::start_in(dir.path());
    let svc = dir.write(
        "service.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: product-catalog}\nspec:\n  ports: [{port: 80, appProtocol: http}]\n",
    );
    let (code, _, err) = cp.cli(&["apply", "-f", svc.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // No protocol flag: the sidecar binds its inbound listener before the control plane's
    // view (with the Service) arrives, and takes the declaration from it.
    let catalog = mtls_catalog(&cp, dir.path());
    let admin = admin_port(&catalog);
    let inbound_port: u16 = wait_for(READY, "the catalog to register", || {
        let (_, workloads, _) = cp.cli(&["get", "workloads", "-o", "json"]);
        workloads
            .lines()
            .find(|l| l.contains("\"address\""))
            .and_then(|l| l.split('"').nth(3))
            .and_then(|a| a.rsplit(':').next()?.parse().ok())
    });
    let declared = "trellis_protocol_detections_total{direction=\"inbound\",protocol=\"http1\",how=\"declared\"}";
    wait_for(
        READY,
        "the inbound listener to take the Service's appProtocol",
        || {
            let r = get(inbound_port, "/products/1").ok()?;
            assert_eq!(r.status, 200, "{r:?}");
            (metric(admin, declared).unwrap_or(0.0) >= 1.0).then_some(())
        },
    );
}

#[test]
fn registered_instances_carry_their_locality_and_sidecars_prefer_their_zone() {
    let dir = TempDir::new("locality");
    let cp = ControlPlane::start_in(dir.path());
    let url = cp.url();
    // v1 in zone a (flags), v2 in zone b (environment), both in region r1.
    let instance = |version: &str, zone_args: &[&str], env: &[(&str, &str)]| {
        let port = free_port().to_string();
        let token = token(&cp, "product-catalog");
        let label = format!("version={version}");
        let mut args = vec![
            "--control",
            &url,
            "--service",
            "product-catalog",
            "--port",
            &port,
            "--label",
            &label,
            "--health",
            "http:/healthz",
            "--ttl",
            "2s",
            "--token",
            &token,
            "--region",
            "r1",
        ];
        args.extend_from_slice(zone_args);
        let mut env = env.to_vec();
        env.push(("DEMO_VERSION", version));
        run(
            dir.path(),
            &format!("catalog-{version}"),
            &args,
            &[bin(), "demo-app", "product-catalog"],
            &env,
        )
    };
    let mut v1 = instance("v1", &["--zone", "a"], &[]);
    let _v2 = instance("v2", &[], &[("TRELLIS_ZONE", "b")]);
    // The registry stores each instance's locality.
    wait_for(
        Duration::from_secs(30),
        "both instances registered healthy with their zones",
        || {
            let (_, w, _) = cp.cli(&["get", "workloads", "-o", "json"]);
            (w.contains("\"zone\": \"a\"")
                && w.contains("\"zone\": \"b\"")
                && w.matches("\"region\": \"r1\"").count() == 2
                && w.matches("\"healthy\": true").count() == 2)
                .then_some(())
        },
    );

    // A client sidecar in zone a: once it knows both instances (its locality step counts a
    // choice), every request stays in zone a.
    let up = free_port();
    let client_token = token(&cp, "client");
    let client = run(
        dir.path(),
        "client",
        &[
            "--control",
            &url,
            "--upstream",
            &format!("product-catalog={up}"),
            "--token",
            &client_token,
            "--zone",
            "a",
            "--region",
            "r1",
        ],
        &["sleep", "600"],
        &[],
    );
    let admin = admin_port(&client);
    let zone_picks =
        "trellis_locality_picks_total{backend=\"default/product-catalog:80\",priority=\"zone\"}";
    wait_for(
        Duration::from_secs(30),
        "the client's sidecar to choose by locality",
        || {
            let _ = get(up, "/products/1");
            (metric(admin, zone_picks).unwrap_or(0.0) >= 1.0).then_some(())
        },
    );
    let v = versions(up, 50);
    assert_eq!(v.get("v1"), Some(&50), "{v:?}");

    // Zone a's only instance stops: traffic fails over to zone b.
    v1.stop(Duration::from_secs(10));
    wait_versions(up, &["v2"], Duration::from_secs(20));
}

/// The mesh conformance case mesh-consumer-route through the control plane: a route in `shop`
/// for `default/product-catalog` applies to a client in `shop` only, even with a producer
/// route with the same match in `default`.
#[test]
fn consumer_routes_reach_only_clients_in_their_namespace() {
    let dir = TempDir::new("consumer");
    let cp = ControlPlane::start_in(dir.path());
    let _v1 = catalog(dir.path(), &cp.url(), "v1", &token(&cp, "product-catalog"));
    let (shop_up, default_up) = (free_port(), free_port());
    let (code, shop_token, err) = cp.cli(&[
        "token",
        "create",
        "--service",
        "client",
        "--namespace",
        "shop",
    ]);
    assert_eq!(code, 0, "{err}");
    let _shop = run(
        dir.path(),
        "shop-client",
        &[
            "--control",
            &cp.url(),
            "--namespace",
            "shop",
            "--upstream",
            &format!("default/product-catalog={shop_up}"),
            "--token",
            shop_token.trim(),
        ],
        &["sleep", "600"],
        &[],
    );
    let _default = client(
        dir.path(),
        &cp.url(),
        default_up,
        "default-client",
        &token(&cp, "client"),
    );
    wait_versions(shop_up, &["v1"], READY);
    wait_versions(default_up, &["v1"], READY);

    let marked = |route: &str, ns: &str, parent_ns: &str| {
        format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {route}, namespace: {ns}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: product-catalog, namespace: {parent_ns}}}]
  rules:
    - backendRefs: [{{name: product-catalog, namespace: default, port: 80}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{{name: x-route, value: {route}}}]
"
        )
    };
    let routes = dir.write(
        "routes.yaml",
        &(marked("producer", "default", "default") + &marked("consumer", "shop", "default")),
    );
    let (code, out, err) = cp.cli(&["apply", "-f", routes.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let route_at = |port: u16| {
        get(port, "/products/1")
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.headers.get("x-route").cloned())
    };
    wait_for(READY, "the consumer route at the shop client", || {
        (route_at(shop_up).as_deref() == Some("consumer")).then_some(())
    });
    wait_for(READY, "the producer route at the default client", || {
        (route_at(default_up).as_deref() == Some("producer")).then_some(())
    });
    for _ in 0..10 {
        assert_eq!(route_at(shop_up).as_deref(), Some("consumer"));
        assert_eq!(route_at(default_up).as_deref(), Some("producer"));
    }
}
