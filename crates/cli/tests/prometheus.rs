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
use std::path::{Path, PathBuf};
use std::process::Command;
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
