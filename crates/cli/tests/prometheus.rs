//! deploy/prometheus and deploy/grafana against the real tools: promtool checks and unit-tests
//! the rules, and a real Prometheus discovers a live mesh through the control plane, fires a
//! burn-rate alert into a real Alertmanager whose webhook is this test, and answers every
//! dashboard panel's query.
//!
//! Needs Debian's `prometheus` (with promtool) and `prometheus-alertmanager`. Without them
//! these tests fail in CI (`CI=true`) and are skipped with a message elsewhere.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// The first of `names` on PATH; `None` (after saying why) when the test should be skipped.
fn tool(names: &[&str]) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|d| names.iter().map(move |n| d.join(n)))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!(
            "{} not installed (Debian: apt-get install -y prometheus prometheus-alertmanager)",
            names.join(" or ")
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run_tool(cmd: &Path, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{} {args:?}:\n{text}", cmd.display());
    text
}

#[test]
fn promtool_checks_the_config_and_rules() {
    let Some(promtool) = tool(&["promtool"]) else {
        return;
    };
    let out = run_tool(
        &promtool,
        &[
            "check",
            "rules",
            "deploy/prometheus/rules/trellis-recording.yml",
            "deploy/prometheus/rules/trellis-alerts.yml",
        ],
    );
    assert!(out.contains("SUCCESS"), "{out}");
    run_tool(
        &promtool,
        &["check", "config", "deploy/prometheus/prometheus.yml"],
    );
}

/// Every alert of the rules has a unit test where it fires and one where it does not.
#[test]
fn promtool_unit_tests_every_alert_firing_and_not() {
    let Some(promtool) = tool(&["promtool"]) else {
        return;
    };
    let out = run_tool(
        &promtool,
        &[
            "test",
            "rules",
            "deploy/prometheus/tests/trellis-alerts.test.yml",
        ],
    );
    assert!(out.contains("SUCCESS"), "{out}");

    let rules = yaml(&deploy().join("prometheus/rules/trellis-alerts.yml"));
    let alerts: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let tests = yaml(&deploy().join("prometheus/tests/trellis-alerts.test.yml"));
    // alert -> (a case where it fires, a case where it does not)
    let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for t in tests["tests"].as_array().unwrap() {
        for case in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let e = seen.entry(name).or_default();
            if fires {
                e.0 = true;
            } else {
                e.1 = true;
            }
        }
    }
    for a in &alerts {
        assert_eq!(
            seen.get(a),
            Some(&(true, true)),
            "{a} needs a firing and a not-firing case in trellis-alerts.test.yml"
        );
    }
}

/// A Prometheus duration (`90s`, `5m`, `1h`, `3d`) in seconds.
fn seconds(d: &str) -> Option<u64> {
    let unit = d.chars().last()?;
    let n: u64 = d[..d.len() - 1].parse().ok()?;
    Some(
        n * match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return None,
        },
    )
}

/// `d` divided by `factor`, in seconds (at least one).
fn shrink(d: &str, factor: u64) -> String {
    let s = seconds(d).unwrap_or_else(|| panic!("not a duration: {d}"));
    format!("{}s", (s / factor).max(1))
}

/// `expr` with every range window (`[1h]`) divided by `factor`.
fn shrink_windows(expr: &str, factor: u64) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('[') {
        let Some(j) = rest[i..].find(']') else { break };
        out.push_str(&rest[..=i]);
        out.push_str(&shrink(&rest[i + 1..i + j], factor));
        out.push(']');
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn windows_shrink_in_ranges_and_keep_the_rest() {
    let cases = [
        ("rate(x[5m])", "rate(x[5s])"),
        ("a[1h] and b[3d] > 14.4", "a[60s] and b[4320s] > 14.4"),
        ("vector(0.999)", "vector(0.999)"),
        ("rate(x[30s])", "rate(x[1s])"),
    ];
    for (expr, want) in cases {
        assert_eq!(shrink_windows(expr, 60), want, "{expr}");
    }
}

/// The rule files of deploy/prometheus with every window and `for` divided by `factor`: the
/// same rules, on a clock a test can wait for.
fn shrunk_rules(dir: &Path, factor: u64) -> Vec<PathBuf> {
    ["trellis-recording.yml", "trellis-alerts.yml"]
        .iter()
        .map(|name| {
            let mut doc = yaml(&deploy().join("prometheus/rules").join(name));
            for g in doc["groups"].as_array_mut().unwrap() {
                for r in g["rules"].as_array_mut().unwrap() {
                    let expr = r["expr"].as_str().unwrap().to_string();
                    r["expr"] = shrink_windows(&expr, factor).into();
                    if let Some(f) = r.get("for").and_then(Value::as_str) {
                        r["for"] = shrink(f, factor).into();
                    }
                }
            }
            // JSON is YAML: Prometheus reads it as is.
            let path = dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
            path
        })
        .collect()
}

/// deploy/prometheus/prometheus.yml pointed at this test's control plane, rules and
/// Alertmanager, scraping and evaluating every second.
fn prometheus_config(cp: &ControlPlane, rules: &[PathBuf], alertmanager: u16) -> String {
    let mut doc = yaml(&deploy().join("prometheus/prometheus.yml"));
    doc["global"]["scrape_interval"] = "1s".into();
    doc["global"]["evaluation_interval"] = "1s".into();
    doc["rule_files"] = rules
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .into();
    doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] =
        vec![format!("127.0.0.1:{alertmanager}")].into();
    let ca = cp.ca().display().to_string();
    let job = &mut doc["scrape_configs"][0];
    job["scrape_timeout"] = "1s".into();
    job["tls_config"]["ca_file"] = ca.clone().into();
    let sd = &mut job["http_sd_configs"][0];
    let url = sd["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://CONTROL:7070/"), "{url}");
    sd["url"] = url
        .replace("CONTROL:7070", &format!("127.0.0.1:{}", cp.port))
        .into();
    sd["refresh_interval"] = "1s".into();
    sd["authorization"]["credentials_file"] = cp.token.display().to_string().into();
    sd["tls_config"]["ca_file"] = ca.into();
    serde_json::to_string_pretty(&doc).unwrap()
}

/// `text` with every byte but unreserved ones percent-encoded, for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector (empty on any error, so callers can poll).
fn query(port: u16, q: &str) -> Vec<Value> {
    get(port, &format!("/api/v1/query?query={}", encode(q)))
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// A webhook receiver: every request body it was sent.
fn webhook() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    // Ends with the test process.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_ok() {
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, bodies)
}

/// Firing alerts the webhook received: (alertname, dst_service).
fn received(bodies: &Mutex<Vec<String>>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for b in bodies.lock().unwrap().iter() {
        let Ok(v) = serde_json::from_str::<Value>(b) else {
            continue;
        };
        for a in v["alerts"].as_array().into_iter().flatten() {
            if a["status"] == "firing" {
                out.push((
                    a["labels"]["alertname"].as_str().unwrap_or_default().into(),
                    a["labels"]["dst_service"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                ));
            }
        }
    }
    out
}

fn wait_ready(port: u16, what: &str, p: &mut Proc) {
    wait_for(Duration::from_secs(30), what, || {
        if p.exited() {
            panic!("{what} exited:\n{}", p.log_text());
        }
        get(port, "/-/ready").ok().filter(|r| r.status == 200)
    });
}

/// Every panel query of every dashboard, with its dashboard and panel titles.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = deploy().join("grafana");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let title = d["title"].as_str().unwrap_or_default().to_string();
        let mut panels: Vec<&Value> = Vec::new();
        for p in d["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            // Panels inside collapsed rows.
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        title.clone(),
                        p["title"].as_str().unwrap_or_default().to_string(),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// `expr` with Grafana's variables replaced by `values` (and its interval variables by a
/// window the test's data fills).
fn substitute(expr: &str, values: &BTreeMap<&str, &str>) -> String {
    let mut out = expr
        .replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "30s");
    // Longest names first, so `$service` does not eat `$service_x`.
    let mut names: Vec<_> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in names {
        out = out
            .replace(&format!("${{{n}}}"), values[n])
            .replace(&format!("${n}"), values[n]);
    }
    assert!(!out.contains('$'), "unknown variable in {expr}");
    out
}

#[test]
fn a_real_prometheus_discovers_the_mesh_alerts_through_alertmanager_and_answers_every_panel() {
    let (Some(prometheus), Some(alertmanager)) = (
        tool(&["prometheus"]),
        tool(&["prometheus-alertmanager", "alertmanager"]),
    ) else {
        return;
    };
    let dir = TempDir::new("prometheus");
    let cp = ControlPlane::start_in(dir.path());
    let url = cp.url();

    // product-catalog answers 500 to everything but its health check; inventory is healthy.
    let catalog_port = free_port();
    let catalog = catalog_env(
        dir.path(),
        "catalog",
        &url,
        catalog_port,
        "v1",
        &token(&cp, "product-catalog"),
        &[],
        &[("FAIL_STATUS", "500")],
    );
    let inventory_port = free_port().to_string();
    let inventory = run(
        dir.path(),
        "inventory",
        &[
            "--control",
            &url,
            "--service",
            "inventory",
            "--port",
            &inventory_port,
            "--health",
            "http:/healthz",
            "--token",
            &token(&cp, "inventory"),
        ],
        &[bin(), "demo-app", "inventory"],
        &[],
    );
    let (to_catalog, to_inventory) = (free_port(), free_port());
    let client = run(
        dir.path(),
        "client",
        &[
            "--control",
            &url,
            "--upstream",
            &format!("product-catalog={to_catalog}"),
            "--upstream",
            &format!("inventory={to_inventory}"),
            "--token",
            &token(&cp, "client"),
        ],
        &["sleep", "600"],
        &[],
    );
    let admin = admin_port(&client);
    admin_port(&catalog);
    admin_port(&inventory);
    wait_endpoints(admin, "product-catalog", 1);
    wait_endpoints(admin, "inventory", 1);

    // Steady traffic to both until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = get(to_catalog, "/products/1");
                let _ = get(to_inventory, "/stock/1");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let (hook, bodies) = webhook();
    let am_port = free_port();
    let am_dir = dir.path().join("alertmanager");
    std::fs::create_dir_all(&am_dir).unwrap();
    let am_config = dir.write(
        "alertmanager.yml",
        &serde_json::json!({
            "route": {
                "receiver": "test",
                "group_by": ["alertname", "dst_service"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{
                "name": "test",
                "webhook_configs": [{"url": format!("http://127.0.0.1:{hook}/")}],
            }],
        })
        .to_string(),
    );
    let mut cmd = Command::new(&alertmanager);
    cmd.arg(format!("--config.file={}", am_config.display()))
        .arg(format!("--storage.path={}", am_dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=");
    let mut am = Proc::spawn("alertmanager", dir.path(), cmd);
    wait_ready(am_port, "alertmanager", &mut am);

    // Windows and `for` a sixtieth of the real ones: 1h is 60s, 5m is 5s, `for: 2m` is 2s.
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir_all(&rules_dir).unwrap();
    let rules = shrunk_rules(&rules_dir, 60);
    let config = dir.write("prometheus.yml", &prometheus_config(&cp, &rules, am_port));
    let prom_port = free_port();
    let mut cmd = Command::new(&prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
    let mut prom = Proc::spawn("prometheus", dir.path(), cmd);
    wait_ready(prom_port, "prometheus", &mut prom);

    // Discovery: the three sidecars and the control plane, labeled, all up.
    wait_for(
        Duration::from_secs(30),
        "Prometheus to scrape three sidecars and the control plane",
        || {
            let proxies = query(prom_port, r#"up{job="trellis-proxy"} == 1"#);
            let control = query(prom_port, r#"up{job="trellis-control"} == 1"#);
            (proxies.len() == 3 && control.len() == 1).then_some(proxies)
        },
    );
    let services: Vec<String> = query(prom_port, r#"up{job="trellis-proxy"}"#)
        .iter()
        .map(|s| s["metric"]["service"].as_str().unwrap_or("").to_string())
        .collect();
    for s in ["product-catalog", "inventory"] {
        assert!(services.iter().any(|x| x == s), "{services:?}");
    }

    // The failing service's fast burn-rate alert reaches the webhook.
    wait_for(
        Duration::from_secs(60),
        "the burn-rate alert for product-catalog at the webhook",
        || {
            received(&bodies)
                .iter()
                .any(|(a, s)| a == "TrellisErrorBudgetBurnFast" && s == "product-catalog")
                .then_some(())
        },
    );
    // The healthy one has traffic, an error ratio of zero, and no alert.
    let ratio = query(
        prom_port,
        r#"service:trellis_http_errors:ratio_rate5m{dst_service="inventory"}"#,
    );
    assert_eq!(ratio.len(), 1, "{ratio:?}");
    assert_eq!(ratio[0]["value"][1], "0", "{ratio:?}");
    let firing = query(prom_port, r#"ALERTS{dst_service="inventory"}"#);
    assert!(firing.is_empty(), "{firing:?}");
    assert!(
        !received(&bodies).iter().any(|(_, s)| s == "inventory"),
        "{:?}",
        received(&bodies)
    );

    // Every dashboard panel's query answers with data from the live mesh.
    let values = BTreeMap::from([
        ("namespace", "default"),
        ("service", "product-catalog"),
        ("route", ".*"),
        ("proxy", ".*"),
    ]);
    let panels = panel_queries();
    assert!(panels.len() >= 20, "{} panel queries", panels.len());
    let mut empty = Vec::new();
    for (dashboard, panel, expr) in &panels {
        let q = substitute(expr, &values);
        if query(prom_port, &q).is_empty() {
            empty.push(format!("{dashboard} / {panel}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    eprintln!(
        "{} panel queries answered; alerts received: {:?}",
        panels.len(),
        received(&bodies)
    );

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
}
