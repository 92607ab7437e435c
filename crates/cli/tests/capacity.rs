//! The capacity report from real sidecars: an app under `trellis run` serving requests
//! through a client sidecar; its sidecar's reports carry the CPU and memory of the sidecar
//! and of the app, and the control plane turns them into `trellis report capacity` and the
//! `trellis_capacity_recommended_instances` metric.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use support::*;

#[test]
fn real_sidecars_report_cpu_and_memory_and_the_metric_follows() {
    let dir = TempDir::new("capacity");
    let SmallMesh {
        cp,
        up,
        catalog: _catalog,
        client: _client,
    } = small_mesh(&dir);

    // Steady load through the mesh while the report is read.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                let _ = get(up, "/products/1");
                n += 1;
            }
            n
        })
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let row = wait_for(
        READY,
        "CPU and memory of the catalog and its sidecar",
        || {
            let (code, out, _) = cp.cli(&["report", "capacity", "--window", "30s", "-o", "json"]);
            if code != 0 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            let row = v["services"]
                .as_array()?
                .iter()
                .find(|s| s["service"] == "default/product-catalog")?
                .clone();
            let positive = |k: &str| row[k].as_f64().is_some_and(|x| x > 0.0);
            (positive("appCores") && positive("sidecarCores") && positive("rps")).then_some(row)
        },
    );
    let f = |k: &str| row[k].as_f64().unwrap();
    // Plausible: some CPU, less than the machine has; megabytes, not gigabytes.
    for k in ["appCores", "sidecarCores"] {
        assert!(f(k) > 0.0 && f(k) <= cores, "{k}: {row}");
    }
    for k in ["appMemoryBytes", "sidecarMemoryBytes"] {
        assert!(f(k) > 1e6 && f(k) < 2e9, "{k}: {row}");
    }
    assert_eq!(row["instances"], 1, "{row}");
    assert_eq!(row["appsMeasured"], 1, "started by trellis run: {row}");
    assert!(row["recommendedInstances"].as_u64().unwrap() >= 1, "{row}");
    let arithmetic = row["arithmetic"].as_str().unwrap();
    assert!(arithmetic.contains("ms per request"), "{arithmetic}");
    assert!(arithmetic.ends_with("(now 1)"), "{arithmetic}");

    // The table shows the same row and its arithmetic.
    let (code, table, err) = cp.cli(&["report", "capacity", "--latency-objective", "1ms"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("objective: p99 ≤ 1 ms"), "{table}");
    assert!(table.contains("default/product-catalog: cpu:"), "{table}");

    // The metric an autoscaler reads, without credentials.
    let metrics = cp.https("GET", "/metrics", "").unwrap().body;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "trellis_capacity_recommended_instances{namespace=\"default\",service=\"product-catalog\"}",
            )
        })
        .unwrap_or_else(|| panic!("no recommendation metric in:\n{metrics}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= 1.0, "{line}");
    assert!(
        metrics.contains(
            "trellis_capacity_cpu_cores{namespace=\"default\",service=\"product-catalog\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.trim_end().ends_with("# EOF"),
        "one exposition, one end"
    );

    stop.store(true, Ordering::Relaxed);
    assert!(load.join().unwrap() > 0);
}
