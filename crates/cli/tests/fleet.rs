//! The fleet view with nothing installed: `trellis stat`, `top`, `edges` and `tap` against a
//! real `trellis demo` right after it starts, and a stopped proxy ageing out of `stat`.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::*;

const READY: Duration = Duration::from_secs(90);

const SERVICES: [&str; 4] = [
    "product-catalog",
    "order-processing",
    "inventory",
    "payment",
];

struct Demo {
    proc: Proc,
    control: String,
    token: std::path::PathBuf,
    /// The load generator's sidecar: order-processing through the mesh.
    orders: u16,
}

impl Demo {
    fn start(dir: &TempDir) -> Demo {
        let mut cmd = trellis();
        cmd.args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--rate",
            "30",
            "--data-dir",
        ])
        .arg(dir.path().join("data"));
        let proc = Proc::spawn("demo", dir.path(), cmd);
        let banner = wait_for(READY, "the demo's banner", || {
            let text = proc.log_text();
            text.contains("Ctrl-C stops everything").then_some(text)
        });
        let after = |prefix: &str| {
            banner
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string))
                .unwrap_or_else(|| panic!("the banner has {prefix:?}: {banner}"))
        };
        let control = after("control plane")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let load = after("load");
        let orders = load
            .rsplit_once(':')
            .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("the load generator's port in {load:?}"));
        Demo {
            proc,
            control,
            token: dir.path().join("data/admin-token"),
            orders,
        }
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli(&self.control, &self.token, args)
    }

    /// `trellis tap ARGS` in the background, its output in `dir/NAME.out`; returns once the
    /// control plane has opened it.
    fn tap(&self, dir: &TempDir, name: &str, args: &[&str]) -> (Proc, std::path::PathBuf) {
        let out = dir.path().join(format!("{name}.out"));
        let log = dir.path().join(format!("{name}.log"));
        let child = trellis()
            .arg("tap")
            .args(args)
            .env("TRELLIS_CONTROL", &self.control)
            .env("TRELLIS_ADMIN_TOKEN_FILE", &self.token)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut proc = Proc {
            name: name.into(),
            child,
            log,
        };
        // Readiness: the "tapping" line on stderr, once the control plane opened the tap.
        wait_for(Duration::from_secs(20), "the tap to start", || {
            if proc.exited() && !proc.log_text().contains("tapping") {
                panic!("tap exited: {}", proc.log_text());
            }
            proc.log_text().contains("tapping").then_some(())
        });
        (proc, out)
    }
}

/// Waits (bounded) for the tap to end by itself while `poke` sends requests; its output.
fn finish_tap(mut tap: Proc, out: &std::path::Path, mut poke: impl FnMut()) -> String {
    wait_for(Duration::from_secs(30), "the tap to end by itself", || {
        if tap.exited() {
            return Some(());
        }
        poke();
        None
    });
    assert!(
        tap.child.wait().unwrap().success(),
        "tap failed: {}",
        tap.log_text()
    );
    assert!(
        tap.log_text().contains("tap ended (max)"),
        "{}",
        tap.log_text()
    );
    std::fs::read_to_string(out).unwrap()
}

#[test]
fn stat_top_edges_and_tap_show_the_demo_right_after_it_starts() {
    let dir = TempDir::new("fleet-demo");
    let demo = Demo::start(&dir);

    // stat: every demo service, with traffic, within a bounded wait.
    let mut last = String::new();
    wait_for(READY, "stat to show the four demo services", || {
        let (code, out, err) = demo.cli(&["stat"]);
        assert_eq!(code, 0, "{err}");
        last = out;
        let all = SERVICES.iter().all(|s| {
            last.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(s) && l.contains('%'))
        });
        if !all {
            std::thread::sleep(Duration::from_millis(500));
        }
        all.then_some(())
    });
    eprintln!("{last}");
    let (code, json, err) = demo.cli(&["stat", "-o", "json", "--window", "1m"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for s in v["services"].as_array().unwrap() {
        assert!(s["rps"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["successRate"].as_f64().unwrap() > 0.5, "{s}");
        assert!(
            s["p99Ms"].as_f64().unwrap() >= s["p50Ms"].as_f64().unwrap(),
            "{s}"
        );
    }
    assert_eq!(v["windowSeconds"], 60.0);
    // The service filter.
    let (_, one, _) = demo.cli(&["stat", "payment"]);
    assert!(
        one.contains("payment") && !one.contains("inventory"),
        "{one}"
    );

    // top --once (and stdout is not a terminal): one frame.
    let (code, top, err) = demo.cli(&["top", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert!(top.starts_with("trellis top:"), "{top}");
    for s in SERVICES {
        assert!(top.contains(s), "{s} in {top}");
    }

    // edges: the calls of the order path, each over mutual TLS.
    let (code, edges, err) = demo.cli(&["edges"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("{edges}");
    for (src, dst) in [
        ("default/load-generator", "default/order-processing"),
        ("default/order-processing", "default/product-catalog"),
        ("default/order-processing", "default/inventory"),
        ("default/order-processing", "default/payment"),
    ] {
        let line = edges
            .lines()
            .find(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                c.first() == Some(&src) && c.get(1) == Some(&dst)
            })
            .unwrap_or_else(|| panic!("edge {src} -> {dst} in {edges}"));
        assert_eq!(line.split_whitespace().nth(4), Some("yes"), "mTLS: {line}");
        assert!(line.contains(&format!(
            "spiffe://trellis.local/ns/default/sa/{}",
            &src[8..]
        )));
    }

    // tap --max N: N live requests, then it stops by itself.
    let (code, events, err) = demo.cli(&["tap", "--max", "5"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(events.lines().count(), 5, "{events}");
    for l in events.lines() {
        assert!(l.contains(":status=") && l.contains("tls=true"), "{l}");
    }
    assert!(err.contains("tap ended (max): 5 events"), "{err}");

    // A path filter with headers: only that path, its authorization header redacted.
    let (tap, out) = demo.tap(
        &dir,
        "tap-path",
        &["--path", "/tap-probe", "--show-headers", "--max", "2"],
    );
    let probe = || {
        let _ = get_with(
            demo.orders,
            "/tap-probe/1",
            ("authorization", "Bearer sekrit-token"),
        );
    };
    let shown = finish_tap(tap, &out, probe);
    eprintln!("{shown}");
    assert_eq!(shown.lines().count(), 2, "{shown}");
    for l in shown.lines() {
        assert!(l.contains("/tap-probe/1"), "{l}");
        assert!(l.contains("authorization=\"[redacted]\""), "{l}");
    }
    assert!(!shown.contains("sekrit"), "{shown}");

    // A status filter: only 404s, while the demo's orders (201) keep flowing.
    let (tap, out) = demo.tap(&dir, "tap-status", &["--status", "404", "--max", "3"]);
    let shown = finish_tap(tap, &out, || {
        let _ = get(demo.orders, "/no-such-page");
    });
    assert_eq!(shown.lines().count(), 3, "{shown}");
    for l in shown.lines() {
        assert!(l.contains(":status=404"), "{l}");
    }

    // Only an admin-token holder can tap.
    for (env, value, says) in [
        ("TRELLIS_ADMIN_TOKEN", "wrong", "wrong admin token"),
        (
            "TRELLIS_ADMIN_TOKEN_FILE",
            "/nonexistent/admin-token",
            "needs the admin token",
        ),
    ] {
        let out = trellis()
            .args(["tap", "--max", "1", "--duration", "5s"])
            .env("TRELLIS_CONTROL", &demo.control)
            .env("TRELLIS_CA_FILE", demo.token.with_file_name("ca.pem"))
            .env_remove("TRELLIS_ADMIN_TOKEN")
            .env("TRELLIS_ADMIN_TOKEN_FILE", &demo.token)
            .env(env, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(out.stdout.is_empty());
    }
    let mut demo = demo;
    demo.proc.stop(Duration::from_secs(30));
}

#[test]
fn a_stopped_proxy_ages_out_of_stat() {
    let dir = TempDir::new("fleet-age");
    let cp = ControlPlane::start_in(dir.path());
    let port = free_port();
    let mut catalog = catalog(dir.path(), &cp.url(), "v1", &token(&cp, "product-catalog"));
    let _client = client(dir.path(), &cp.url(), port, "client", &token(&cp, "shop"));
    let serving = |out: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some("product-catalog"))
            .map(|l| l.split_whitespace().nth(2) == Some("1"))
    };
    wait_for(READY, "stat to show the catalog's one proxy", || {
        let _ = get(port, "/products/1");
        let (code, out, err) = cp.cli(&["stat", "--window", "4s"]);
        assert_eq!(code, 0, "{err}");
        serving(&out).unwrap_or(false).then_some(())
    });
    catalog.stop(Duration::from_secs(10));
    // Its reports leave the window; the client's requests now fail at its own sidecar.
    wait_for(
        Duration::from_secs(30),
        "the stopped catalog to age out",
        || {
            let _ = get(port, "/products/1");
            let (_, out, _) = cp.cli(&["stat", "--window", "4s"]);
            if serving(&out).is_some() {
                std::thread::sleep(Duration::from_millis(500));
                None
            } else {
                Some(())
            }
        },
    );
}
