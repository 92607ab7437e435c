//! Global rate limits end to end: three `trellis run` instances of product-catalog share one
//! Inbound Global limit through a real `trellis control`; the total they admit stays within
//! the documented bound (docs/config.md, "Global limits") while load is spread, when it
//! moves to another instance, when the control plane restarts, and when the replica the
//! sidecars use dies (two replicas on a real etcd).
//!
//! Load is light (at most 300 requests per second in all) so two cores suffice.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;

/// The limit's rate (per second) and burst.
const RATE: f64 = 150.0;
const BURST: f64 = 30.0;
/// The documented bound: over T seconds the instances admit at most
/// `RATE·(T + LAG) + BURST + INSTANCES`.
const LAG: f64 = 0.5;
const INSTANCES: usize = 3;

const POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: product-catalog}
spec:
  ports: [{port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: catalog-global}
spec:
  targetRef: {kind: Service, name: product-catalog}
  limits:
    - {name: total, rate: 150, burst: 30, scope: Global}
"#;

const SHARE: &str =
    "trellis_rate_limit_global_share{policy=\"default/catalog-global\",limit=\"total\"}";

fn bound(seconds: f64) -> f64 {
    RATE * (seconds + LAG) + BURST + INSTANCES as f64
}

/// Open-loop-ish load: one thread per instance at its own rate (0: idle), counting 200s.
/// `/healthz` is answered at once (the catalog's pages take tens of milliseconds).
struct Load {
    rates: Vec<Arc<AtomicU32>>,
    ok: Vec<Arc<AtomicU64>>,
    limited: Arc<AtomicU64>,
    /// Failures that are neither 200 nor 429 (none expected).
    other: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(ports: &[u16]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let limited = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let (mut rates, mut ok, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for &port in ports {
            let rate = Arc::new(AtomicU32::new(0));
            let count = Arc::new(AtomicU64::new(0));
            let (r, c, l, s) = (rate.clone(), count.clone(), limited.clone(), stop.clone());
            let o = other.clone();
            threads.push(std::thread::spawn(move || {
                let mut conn = KeepAlive::new(port);
                let mut next = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    let per_second = r.load(Ordering::Relaxed);
                    if per_second == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                        next = Instant::now();
                        continue;
                    }
                    match conn.get("/healthz") {
                        Ok(resp) if resp.status == 200 => {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(resp) if resp.status == 429 => {
                            l.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    next += Duration::from_secs_f64(1.0 / f64::from(per_second));
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_millis(200) {
                        next = now; // fell behind: do not burst to catch up
                    }
                }
            }));
            rates.push(rate);
            ok.push(count);
        }
        Load {
            rates,
            ok,
            limited,
            other,
            stop,
            threads,
        }
    }

    fn set(&self, per_second: &[u32]) {
        for (r, v) in self.rates.iter().zip(per_second) {
            r.store(*v, Ordering::Relaxed);
        }
    }

    fn admitted(&self) -> u64 {
        self.ok.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Admitted requests during `seconds` from now, and the seconds measured.
    fn window(&self, seconds: f64) -> (f64, f64) {
        let (start, before) = (Instant::now(), self.admitted());
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let n = self.admitted() - before;
        (n as f64, start.elapsed().as_secs_f64())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Asserts a window's total within the bound (and above a floor, so a limit that admits
/// almost nothing cannot pass).
fn check(what: &str, load: &Load, seconds: f64) {
    let (n, t) = load.window(seconds);
    let (hi, lo) = (bound(t), 0.6 * RATE * t);
    eprintln!(
        "{what}: {n} admitted in {t:.2}s (bound {hi:.0}, floor {lo:.0}); so far {} limited, {} failed",
        load.limited.load(Ordering::Relaxed),
        load.other.load(Ordering::Relaxed)
    );
    assert!(
        n <= hi,
        "{what}: {n} admitted in {t:.2}s, over the bound {hi:.0}"
    );
    assert!(n >= lo, "{what}: {n} admitted in {t:.2}s, under {lo:.0}");
}

/// Three product-catalog instances (their admin and inbound ports) on `control`.
fn instances(dir: &TempDir, cp: &ControlPlane, control: &str) -> (Vec<Proc>, Vec<u16>, Vec<u16>) {
    let procs: Vec<Proc> = (0..INSTANCES)
        .map(|i| {
            let v = format!("v{i}");
            let token = token(cp, "product-catalog");
            catalog_on(
                dir.path(),
                &format!("catalog-{i}"),
                control,
                free_port(),
                &v,
                &token,
            )
        })
        .collect();
    let admins: Vec<u16> = procs.iter().map(admin_port).collect();
    let inbound = wait_for(READY, "three registered instances", || {
        let (_, out, _) = cp.cli(&["get", "workloads", "-o", "json"]);
        let doc: serde_json::Value = serde_json::from_str(&out).ok()?;
        let items = doc.as_array().or_else(|| doc["items"].as_array())?.clone();
        let port_of = |v: &str| {
            items.iter().find_map(|w| {
                let w = w.get("spec").unwrap_or(w);
                (w["labels"]["version"] == v)
                    .then(|| w["address"].as_str()?.rsplit(':').next()?.parse().ok())
                    .flatten()
            })
        };
        (0..INSTANCES)
            .map(|i| port_of(&format!("v{i}")))
            .collect::<Option<Vec<u16>>>()
    });
    (procs, admins, inbound)
}

/// Waits until every instance has a share and the shares sum to the limit.
fn wait_shares(admins: &[u16], what: &str) -> Vec<f64> {
    wait_for(READY, what, || {
        let shares: Option<Vec<f64>> = admins.iter().map(|a| metric(*a, SHARE)).collect();
        let shares = shares?;
        ((shares.iter().sum::<f64>() - RATE).abs() < 1.0).then_some(shares)
    })
}

fn apply_policy(dir: &TempDir, cp: &ControlPlane) {
    let f = dir.write("policy.yaml", POLICY);
    let (code, out, err) = cp.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn one_global_limit_holds_across_three_instances_when_demand_moves_and_the_control_plane_restarts()
{
    let dir = TempDir::new("quota");
    let store = dir.path().join("store").display().to_string();
    let port = free_port();
    let mut cp = ControlPlane::start("control", dir.path(), port, &store);
    apply_policy(&dir, &cp);
    let (_procs, admins, inbound) = instances(&dir, &cp, &cp.url());
    wait_shares(&admins, "three shares summing to the limit");
    let load = Load::start(&inbound);

    // Spread: 100 per second offered to each, twice the limit in all.
    load.set(&[100, 100, 100]);
    std::thread::sleep(Duration::from_secs(1));
    check("spread", &load, 3.0);
    assert!(
        load.limited.load(Ordering::Relaxed) > 0,
        "the limit refused some"
    );

    // Demand moves: all of it on instance 0, then on instance 1.
    load.set(&[250, 0, 0]);
    let busy = |i: usize, what: &str| {
        let start = Instant::now();
        wait_for(Duration::from_secs(10), what, || {
            (metric(admins[i], SHARE)? >= 0.8 * RATE).then_some(())
        });
        let t = start.elapsed();
        eprintln!("{what} after {t:?}");
        assert!(t < Duration::from_secs(2), "{what} took {t:?}");
    };
    busy(0, "instance 0 holding most of the limit");
    load.set(&[0, 250, 0]);
    let (before, t0) = (load.admitted(), Instant::now());
    busy(1, "instance 1 holding most of the limit");
    std::thread::sleep(Duration::from_secs(2));
    let (n, t) = (
        (load.admitted() - before) as f64,
        t0.elapsed().as_secs_f64(),
    );
    eprintln!("moved: {n} admitted in {t:.2}s (bound {:.0})", bound(t));
    assert!(n <= bound(t), "moved: {n} in {t:.2}s over {:.0}", bound(t));
    check("moved, settled", &load, 2.0);

    // The control plane stops: every sidecar keeps its last share.
    load.set(&[100, 100, 100]);
    std::thread::sleep(Duration::from_secs(1));
    let shares = wait_shares(&admins, "shares for spread load");
    cp.proc.kill_hard();
    check("control plane down", &load, 3.0);
    for (a, s) in admins.iter().zip(&shares) {
        let now = metric(*a, SHARE).unwrap();
        assert!((now - s).abs() < 1.0, "kept share {s}, now {now}");
    }

    // It comes back on the same store: the sidecars reconnect and share again.
    let cp = ControlPlane::start("control-again", dir.path(), port, &store);
    load.set(&[250, 0, 0]);
    busy(0, "after the restart, instance 0 holding most of the limit");
    // Every sidecar reconnects within its backoff (at most 2 s) and reports again.
    std::thread::sleep(Duration::from_secs(2));
    check("after the restart", &load, 2.0);
    drop(cp);
}

#[cfg(feature = "etcd")]
#[path = "../../control/tests/support/etcd.rs"]
mod etcd;

#[cfg(feature = "etcd")]
#[test]
fn shares_hold_when_the_replica_the_sidecars_use_dies() {
    let dir = TempDir::new("quota-etcd");
    let etcd = etcd::Etcd::start();
    let store = format!(
        "etcd://{}/quota-test",
        etcd.endpoint.trim_start_matches("http://")
    );
    let mut a = ControlPlane::start("control-a", dir.path(), free_port(), &store);
    let b = ControlPlane::start("control-b", dir.path(), free_port(), &store);
    apply_policy(&dir, &a);
    let both = format!("{},{}", a.url(), b.url());
    let (_procs, admins, inbound) = instances(&dir, &a, &both);
    wait_shares(&admins, "three shares summing to the limit");
    let load = Load::start(&inbound);
    load.set(&[100, 100, 100]);
    std::thread::sleep(Duration::from_secs(1));
    check("on replica a", &load, 2.0);

    // Replica a dies: the sidecars move to b, which knows their demand from etcd.
    a.proc.kill_hard();
    check("during the failover", &load, 3.0);
    load.set(&[250, 0, 0]);
    let start = Instant::now();
    wait_for(
        READY,
        "instance 0 holding most of the limit through b",
        || (metric(admins[0], SHARE)? >= 0.8 * RATE).then_some(()),
    );
    eprintln!("rebalanced through b after {:?}", start.elapsed());
    check("on replica b", &load, 2.0);
    let metrics = b.https("GET", "/metrics", "").unwrap().body;
    assert!(
        metrics.contains("trellis_control_quota_instances 3"),
        "{metrics}"
    );
}
