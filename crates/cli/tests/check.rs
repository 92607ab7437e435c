//! `trellis check` against real processes on loopback: a healthy mesh passes; a proxy that
//! refuses its config (NACK) fails the sync check with its error and a hint; a stopped
//! control plane fails the first check with a hint and skips the rest.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn check_passes_on_a_healthy_mesh_and_fails_on_a_nack() {
    let dir = TempDir::new("check");
    let SmallMesh {
        cp,
        catalog: _catalog,
        client: _client,
        ..
    } = small_mesh(&dir);

    let (code, out, err) = cp.cli(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "√ control plane: reachable at https://127.0.0.1:",
        "√ store: redb: reads go through",
        "√ CA: trust domain trellis.local, 1 root(s)",
        "√ clock skew: the control plane is",
        "√ proxies in sync: 2 proxies at revision",
        "√ certificates: 2 workload certificate(s)",
        "√ trust bundle: 1 root(s) at https://127.0.0.1:",
        "all checks passed",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // A proxy whose local listener needs billing:8080 refuses a view where billing has no
    // such port: it NACKs, and check says which proxy, what it refused and what to do.
    let billing = dir.write(
        "billing.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: billing}\nspec:\n  ports: [{port: 8082}]\n",
    );
    let (code, out, err) = cp.cli(&["apply", "-f", billing.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
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
    wait_for(READY, "the NACK to show", || {
        let (_, out, _) = cp.cli(&["get", "proxies", "edge-1", "-o", "json"]);
        out.contains("\"nack\"").then_some(())
    });
    let (code, out, err) = cp.cli(&["check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(
            "× proxies in sync: 1 of 3 refused their config (NACK): edge-1 refused revision"
        ),
        "{out}"
    );
    assert!(out.contains("Service billing has no port 8080"), "{out}");
    assert!(
        out.contains("    hint: the proxy keeps its previous config: fix what its error names"),
        "{out}"
    );
    assert!(
        out.contains("√ store:"),
        "the other checks still pass:\n{out}"
    );
    assert!(out.contains("1 check(s) failed"), "{out}");
}

#[test]
fn check_fails_when_the_control_plane_is_stopped() {
    let dir = TempDir::new("check-stopped");
    let mut cp = ControlPlane::start_in(dir.path());
    let (code, out, err) = cp.cli(&["check"]);
    // No proxy yet: a warning, not a failure.
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("‼ proxies in sync: no proxy is connected"),
        "{out}"
    );
    cp.proc.stop(Duration::from_secs(10));
    let (code, out, err) = cp.cli(&["check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("× control plane: https://127.0.0.1:"), "{out}");
    assert!(
        out.contains("    hint: is trellis control running? check --control / TRELLIS_CONTROL"),
        "{out}"
    );
    assert!(
        out.contains("skipped the other checks: no control plane answered"),
        "{out}"
    );
}

#[cfg(feature = "etcd")]
#[path = "../../control/tests/support/etcd.rs"]
mod etcd;

/// Two replicas on a real etcd: check reports each etcd endpoint and compares the replicas'
/// trust bundles; with etcd stopped the store check fails with its hint.
#[cfg(feature = "etcd")]
#[test]
fn check_sees_etcd_and_compares_the_replicas_bundles() {
    let dir = TempDir::new("check-etcd");
    let mut etcd = etcd::Etcd::start();
    let store = format!(
        "etcd://{}/check-test",
        etcd.endpoint.trim_start_matches("http://")
    );
    let a = ControlPlane::start("control-a", dir.path(), free_port(), &store);
    let b = ControlPlane::start("control-b", dir.path(), free_port(), &store);
    let both = format!("{},{}", a.url(), b.url());
    let (code, out, err) = cli(&both, &a.token, &["check"]);
    assert_eq!(code, 0, "{out}{err}");
    let healthy = format!(
        "√ store: etcd: 1 of 1 endpoints healthy, leader {}",
        etcd.endpoint
    );
    assert_eq!(
        out.matches(&healthy).count(),
        2,
        "one line per replica:\n{out}"
    );
    assert!(
        out.contains("√ trust bundle: 2 replicas serve the same 1 root(s)"),
        "{out}"
    );

    etcd.stop();
    let (code, out, err) = cli(&both, &a.token, &["check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("× store: etcd unreachable"), "{out}");
    assert!(
        out.contains("    hint: the control plane cannot read etcd"),
        "{out}"
    );
}
