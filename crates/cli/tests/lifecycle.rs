//! Instances that come and go, with real processes on loopback: `trellis run` killed
//! outright, graceful restarts under load, restarts during a control-plane outage.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;

/// The app `trellis run` started: its only child.
fn app_of(p: &Proc) -> u32 {
    wait_for(
        Duration::from_secs(60),
        "trellis run to start its app",
        || match children(p.pid()).as_slice() {
            [app] => Some(*app),
            _ => None,
        },
    )
}

/// Waits (bounded) until the app on `port` answers its health check.
fn wait_healthy(port: u16) {
    wait_for(Duration::from_secs(60), "the app to answer", || {
        get(port, "/healthz").ok().filter(|r| r.status == 200)
    });
}

#[test]
fn a_killed_trellis_run_takes_its_app_with_it_and_the_instance_restarts_on_its_port() {
    let dir = TempDir::new("sigkill");
    let cp = ControlPlane::start_in(dir.path());
    let port = free_port();
    let tok = token(&cp, "product-catalog");
    let mut first = catalog_on(dir.path(), "catalog", &cp.url(), port, "v1", &tok);
    let app = app_of(&first);
    wait_healthy(port);

    // SIGKILL to `trellis run` alone (not its children): the app dies with it.
    signal(first.pid(), "KILL");
    let _ = first.child.wait();
    let start = Instant::now();
    wait_for(Duration::from_secs(10), "the orphaned app to die", || {
        (!alive(app)).then_some(())
    });
    eprintln!(
        "app gone {:?} after trellis run was killed",
        start.elapsed()
    );

    // The same instance restarts on the same port and serves through the mesh.
    let second = catalog_on(dir.path(), "catalog", &cp.url(), port, "v1", &tok);
    let app2 = app_of(&second);
    wait_healthy(port);
    let up = free_port();
    let _client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    wait_versions(up, &["v1"], Duration::from_secs(60));
    assert!(
        alive(app2),
        "the restarted app runs:\n{}",
        second.log_text()
    );
    assert!(
        !second.log_text().contains("Address already in use"),
        "{}",
        second.log_text()
    );
}

/// Keep-alive GETs through the client sidecar on `port` until `stop`: (answers by version,
/// failures).
fn load(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let mut c = KeepAlive::new(port);
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) && ok.len() + failed.len() < 100_000 {
            match c.get("/products/1") {
                Ok(r) if r.status == 200 => {
                    ok.push(r.headers.get("x-demo-version").cloned().unwrap_or_default())
                }
                Ok(r) => failed.push(format!("{} {:?} {}", r.status, r.headers, r.body)),
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed)
    })
}

#[test]
fn a_graceful_restart_under_keep_alive_load_loses_no_request() {
    let dir = TempDir::new("graceful");
    let cp = ControlPlane::start_in(dir.path());
    let port_a = free_port();
    let tok_a = token(&cp, "product-catalog");
    let mut a = catalog_on(dir.path(), "a", &cp.url(), port_a, "a", &tok_a);
    let _b = catalog_on(
        dir.path(),
        "b",
        &cp.url(),
        free_port(),
        "b",
        &token(&cp, "product-catalog"),
    );
    let up = free_port();
    let _client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    wait_versions(up, &["a", "b"], Duration::from_secs(60));

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(up, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    // SIGTERM: deregister, drain, then stop the app.
    let status = a.stop(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", a.log_text());
    // (Read now: the restart under the same name writes the same log file.)
    let log = a.log_text();
    // The instance comes back on the same port and gets traffic again.
    let _a2 = catalog_on(dir.path(), "a", &cp.url(), port_a, "a", &tok_a);
    wait_for(
        Duration::from_secs(60),
        "the restarted instance to serve",
        || versions(up, 10).contains_key("a").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = loader.join().unwrap();
    eprintln!(
        "{} requests, {} failed",
        ok.len() + failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(ok.len() > 20, "too little load: {}", ok.len());
    assert!(ok.iter().any(|v| v == "b"));
    let at = |what: &str| {
        log.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in the log:\n{log}"))
    };
    assert!(at("deregistered") < at("draining"), "{log}");
    assert!(at("draining") < at("stopping the app"), "{log}");
}

/// The workloads the control plane lists for product-catalog: their `version` labels.
fn registered(cp: &ControlPlane) -> Vec<String> {
    let (_, out, _) = cp.cli(&["get", "workloads"]);
    out.split_whitespace()
        .filter_map(|w| w.split(',').find_map(|l| l.strip_prefix("version=")))
        .map(String::from)
        .collect()
}

#[test]
fn an_instance_restarted_during_a_control_plane_outage_replaces_its_stale_registration() {
    let dir = TempDir::new("stale");
    let store = dir.path().join("store").display().to_string();
    let cp_port = free_port();
    let mut cp = ControlPlane::start("control", dir.path(), cp_port, &store);
    let url = cp.url();
    let port = free_port();
    let tok = token(&cp, "product-catalog");
    // The default 10 s lease: a stale registration would outlive the checks below.
    let instance =
        |name: &str, version: &str| catalog_with(dir.path(), name, &url, port, version, &tok, &[]);
    let mut old = instance("catalog", "old");
    let up = free_port();
    let _client = client(dir.path(), &url, up, "client-state", &token(&cp, "client"));
    wait_versions(up, &["old"], Duration::from_secs(60));

    // The control plane goes down; meanwhile the instance crashes and restarts (same
    // service, same app port, same state directory, a new process).
    cp.proc.kill_hard();
    old.kill_hard();
    let new = instance("catalog", "new");
    wait_healthy(port);

    // The control plane returns: the new instance replaces the stale registration at once.
    let cp = ControlPlane::start("control-2", dir.path(), cp_port, &store);
    let start = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "only the new instance to be registered",
        || (registered(&cp) == ["new"]).then_some(()),
    );
    let replaced = start.elapsed();
    wait_versions(up, &["new"], Duration::from_secs(60));
    let serving = start.elapsed();
    eprintln!(
        "stale registration replaced after {replaced:?}, new instance serving after {serving:?}"
    );
    assert!(
        replaced < Duration::from_secs(8),
        "the stale registration stayed {replaced:?}:\n{}",
        new.log_text()
    );
    assert!(
        serving < Duration::from_secs(8),
        "serving after {serving:?}"
    );
}

/// A TCP server in this process: sends `banner` on connect (if any), then echoes until the
/// client's end, then closes.
fn tcp_server(banner: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(banner);
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// `trellis run` of an instance of the opaque TCP service `echo` whose app is the server on
/// `port` (the app process itself only sleeps).
fn tcp_instance(dir: &std::path::Path, name: &str, cp: &ControlPlane, port: u16) -> Proc {
    run(
        dir,
        name,
        &[
            "--control",
            &cp.url(),
            "--service",
            "echo",
            "--service-port",
            "7000",
            "--port",
            &port.to_string(),
            "--ttl",
            "2s",
            "--token",
            &token(cp, "echo"),
        ],
        &["sleep", "600"],
        &[],
    )
}

#[test]
fn opaque_tcp_across_mutual_tls_follows_endpoints_from_the_control_plane() {
    use std::io::{Read, Write};
    let dir = TempDir::new("tcp-follow");
    let cp = ControlPlane::start_in(dir.path());
    let svc = dir.write(
        "echo.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: echo}\nspec:\n  ports: [{port: 7000, appProtocol: tcp}]\n",
    );
    let (code, out, err) = cp.cli(&["apply", "-f", svc.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // The client's sidecar starts before any instance of echo exists.
    let up = free_port();
    let client = run(
        dir.path(),
        "client",
        &[
            "--control",
            &cp.url(),
            "--upstream",
            &format!("echo={up}"),
            "--token",
            &token(&cp, "client"),
        ],
        &["sleep", "600"],
        &[],
    );
    let admin = admin_port(&client);
    wait_endpoints(admin, "echo", 0);
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", up)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    // The first instance registers: echo, and a half-close that still gets its reply.
    let mut first = tcp_instance(dir.path(), "echo-1", &cp, tcp_server(b""));
    wait_endpoints(admin, "echo", 1);
    let mut s = connect();
    s.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    s.write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");

    // It is replaced by a server-speaks-first one: new connections go there.
    let old = sidecar_endpoints(admin, "echo").unwrap();
    let _second = tcp_instance(dir.path(), "echo-2", &cp, tcp_server(b"220 ready\r\n"));
    wait_endpoints(admin, "echo", 2);
    first.stop(Duration::from_secs(30));
    wait_for(Duration::from_secs(60), "the old endpoint to leave", || {
        let now = sidecar_endpoints(admin, "echo")?;
        (now.len() == 1 && now != old).then_some(())
    });
    let mut s = connect();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"220 ready\r\n");
    let log = client.log_text();
    assert!(!log.contains("no endpoint for TCP"), "{log}");
}

/// `n` keep-alive loaders until `stop`: their answers by version and their failures, merged.
fn load_from(
    n: usize,
    port: u16,
    stop: &Arc<AtomicBool>,
) -> impl FnOnce() -> (Vec<String>, Vec<String>) {
    let loaders: Vec<_> = (0..n).map(|_| load(port, stop.clone())).collect();
    move || {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for l in loaders {
            let (o, f) = l.join().unwrap();
            ok.extend(o);
            failed.extend(f);
        }
        (ok, failed)
    }
}

#[test]
fn a_host_killed_under_load_fails_no_idempotent_request() {
    let dir = TempDir::new("hostkill");
    let cp = ControlPlane::start_in(dir.path());
    // The default 10 s lease: for the seconds that matter the registry still lists the dead
    // host, so only the client sidecar's own failure handling keeps traffic off it.
    let mut hosts: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|v| {
            let tok = token(&cp, "product-catalog");
            catalog_with(dir.path(), v, &cp.url(), free_port(), v, &tok, &[])
        })
        .collect();
    let up = free_port();
    let client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    let admin = admin_port(&client);
    wait_endpoints(admin, "product-catalog", 3);

    let stop = Arc::new(AtomicBool::new(false));
    let finish = load_from(2, up, &stop);
    std::thread::sleep(Duration::from_secs(2));
    // The host that dies is one taking traffic now: the peak-EWMA balancer may rightly leave
    // an instance that answered one request slowly (a cold start on a busy machine) idle for
    // a while, and killing that one would prove nothing.
    let now = versions(up, 20);
    let busiest = now.iter().max_by_key(|(_, n)| **n).map(|(v, _)| v.clone());
    let Some(i) = busiest.and_then(|v| ["a", "b", "c"].iter().position(|x| *x == v)) else {
        panic!("no instance answered: {now:?}");
    };
    let victim_name = ["a", "b", "c"][i];
    // The host dies: sidecar and app SIGKILLed together.
    let victim = &mut hosts[i];
    for pid in tree(victim.pid()) {
        signal(pid, "KILL");
    }
    let _ = victim.child.wait();
    std::thread::sleep(Duration::from_secs(4));
    let listed = sidecar_endpoints(admin, "product-catalog").map_or(0, |e| e.len());
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = finish();
    eprintln!(
        "{} requests, {} failed; the client still listed {listed} endpoints 4 s after the kill",
        ok.len() + failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(ok.len() > 100, "too little load: {}", ok.len());
    assert!(
        ok.iter().any(|o| o == victim_name),
        "{victim_name} never answered"
    );
    assert!(
        ok.iter().any(|o| o != victim_name),
        "only {victim_name} answered"
    );
    assert_eq!(
        listed, 3,
        "the dead host left the registry too early to prove anything"
    );
}

#[test]
fn an_instance_failing_fast_behind_a_green_health_check_is_ejected() {
    let dir = TempDir::new("fast500");
    let cp = ControlPlane::start_in(dir.path());
    let url = cp.url();
    let _good: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|v| {
            let tok = token(&cp, "product-catalog");
            catalog_with(dir.path(), v, &url, free_port(), v, &tok, &[])
        })
        .collect();
    // Every request but /healthz answered 500 at once.
    let bad_port = free_port();
    let _bad = catalog_env(
        dir.path(),
        "bad",
        &url,
        bad_port,
        "bad",
        &token(&cp, "product-catalog"),
        &[],
        &[("FAIL_STATUS", "500")],
    );
    wait_healthy(bad_port);
    let up = free_port();
    let client = client(dir.path(), &url, up, "client-state", &token(&cp, "client"));
    let admin = admin_port(&client);
    wait_endpoints(admin, "product-catalog", 3);

    // Enough requests that 1% means something: at least 1,000 (or 45 s on a slow machine).
    let stop = Arc::new(AtomicBool::new(false));
    let finish = load_from(2, up, &stop);
    let start = Instant::now();
    let answered = || -> f64 {
        get(admin, "/metrics").map_or(0.0, |r| {
            r.body
                .lines()
                .filter(|l| l.starts_with("trellis_http_requests_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
    };
    while answered() < 1_000.0 && start.elapsed() < Duration::from_secs(45) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = finish();
    let total = ok.len() + failed.len();
    eprintln!(
        "{total} requests in {:?}, {} failed",
        start.elapsed(),
        failed.len()
    );
    assert!(total >= 500, "too little load: {total}");
    assert!(
        failed.len() * 100 < total,
        "{} of {total} failed",
        failed.len()
    );
    // Five consecutive 5xx eject it (each loader may see one more before it is out).
    assert!(
        failed.len() <= 7,
        "{} of {total} failed: {failed:#?}",
        failed.len()
    );
    assert!(failed.iter().all(|f| f.starts_with("500")), "{failed:#?}");
    // Its health check stays green: the registry keeps it; the client's sidecar ejected it.
    assert!(registered(&cp).contains(&"bad".to_string()));
    let view: serde_json::Value =
        serde_json::from_str(&get(admin, "/endpoints").unwrap().body).unwrap();
    let ejected: Vec<&serde_json::Value> = view
        .as_object()
        .unwrap()
        .values()
        .flat_map(|b| b["endpoints"].as_array().unwrap())
        .filter(|e| e["timesEjected"].as_u64() > Some(0))
        .collect();
    assert_eq!(ejected.len(), 1, "{view:#}");
    assert_eq!(ejected[0]["usable"], false, "{view:#}");
}
