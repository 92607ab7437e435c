//! Fleet report intake benchmark (run by `bench/fleet.sh`, not a test).
//!
//! Feeds the control plane's fleet view what PROXIES sidecars send every 2 s (a traffic
//! report of 4 series, a usage sample, the policy part) for ROUNDS report intervals of
//! simulated time, in 50 services, the way the report stream's handler does
//! (`Fleet::record`, `record_usage`, `record_policy`: each takes the windows lock). Prints
//! the wall time and the time per report. Every report expiring every window made this grow
//! with the square of the fleet.
//!
//! Usage: fleet_reports [PROXIES] [ROUNDS]

use std::time::Duration;
use tokio::time::Instant;
use trellis_api::wire;
use trellis_control::fleet::{Fleet, Reporter};

fn main() {
    let mut args = std::env::args().skip(1);
    let proxies: u64 = args.next().map_or(5000, |a| a.parse().expect("PROXIES"));
    let rounds: u64 = args.next().map_or(3, |a| a.parse().expect("ROUNDS"));
    let series = |i: u64| wire::TrafficSeries {
        direction: "outbound".into(),
        route: format!("default/route-{i}"),
        backend: format!("default/svc-{i}:80"),
        classes: vec![0, 0, 100, 0, 1],
        latency: vec![10; 12],
        ..Default::default()
    };
    let fleet = Fleet::default();
    let start = Instant::now();
    let wall = std::time::Instant::now();
    for round in 0..rounds {
        for i in 0..proxies {
            let who = Reporter {
                namespace: "default".into(),
                service: format!("svc-{}", i % 50),
                identity: String::new(),
                node: format!("node-{i}"),
            };
            // Each proxy's reports 2 s apart, the fleet's spread over the interval.
            let now = start + Duration::from_millis(round * 2000 + i * 2000 / proxies);
            let report = wire::TrafficReport {
                interval_ms: 2000,
                series: (0..4).map(series).collect(),
                latency_bounds: (1..12).map(|b| f64::from(b) * 0.005).collect(),
            };
            fleet.record(&who, report, now);
            fleet.record_usage(&who, wire::Usage::default(), now);
            fleet.record_policy(&who, 2000, Vec::new(), None, now);
        }
    }
    let took = wall.elapsed();
    let reports = proxies * rounds;
    println!(
        "{proxies} proxies, {rounds} report intervals: {reports} reports in {:.1} ms, {:.2} µs per report",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / reports as f64
    );
}
