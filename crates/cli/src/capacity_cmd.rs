//! `trellis report capacity`: per service, load, CPU and memory, utilization and the
//! recommended instance count with its arithmetic (`GET /v1/capacity`).

use crate::client::Api;
use crate::fleet_cmd::Format;
use anyhow::Result;
use std::time::Duration;
use trellis_control::capacity::CapacityView;

/// What the report aims for; `None` takes the control plane's defaults.
pub struct Args {
    pub latency_objective: Option<Duration>,
    pub target_utilization: Option<f64>,
    pub cores_per_instance: Option<f64>,
    pub window: Duration,
}

fn cores(v: Option<f64>) -> String {
    v.map_or("-".into(), |c| format!("{c:.3}"))
}

fn mib(b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.1}MiB", b as f64 / (1 << 20) as f64)
    }
}

fn opt(v: Option<f64>, unit: &str, scale: f64) -> String {
    v.map_or("-".into(), |v| format!("{:.1}{unit}", v * scale))
}

/// The table, then each service's arithmetic.
pub fn render(v: &CapacityView) -> String {
    let rows: Vec<Vec<String>> = v
        .services
        .iter()
        .map(|s| {
            let (l, r) = (&s.load, &s.recommendation);
            vec![
                s.service.clone(),
                l.instances.to_string(),
                format!("{:.1}", l.rps),
                opt(l.error_rate, "%", 100.0),
                opt(l.p50_ms, "ms", 1.0),
                opt(l.p99_ms, "ms", 1.0),
                cores(l.app_cores),
                cores(l.sidecar_cores),
                mib(l.app_memory_bytes),
                mib(l.sidecar_memory_bytes),
                opt(r.utilization, "%", 100.0),
                r.recommended_instances.to_string(),
            ]
        })
        .collect();
    let o = &v.objective;
    let mut out = format!(
        "objective: p99 ≤ {} ms at {}% CPU utilization, {}; last {}s\n",
        o.latency_objective_ms,
        o.target_utilization * 100.0,
        o.cores_per_instance
            .map_or("cores per instance as reported".to_string(), |c| format!(
                "{c} cores per instance"
            )),
        o.window_seconds
    );
    if rows.is_empty() {
        out.push_str("no service reported in the window\n");
        return out;
    }
    out.push_str(&crate::fleet_cmd::table(
        &[
            "SERVICE",
            "INSTANCES",
            "RPS",
            "ERRORS",
            "P50",
            "P99",
            "APP CPU",
            "SIDECAR CPU",
            "APP MEM",
            "SIDECAR MEM",
            "UTIL",
            "RECOMMENDED",
        ],
        &rows,
    ));
    out.push('\n');
    for s in &v.services {
        out.push_str(&format!("{}: {}\n", s.service, s.recommendation.arithmetic));
    }
    out
}

pub async fn report(api: &Api, a: &Args, format: Format) -> Result<i32> {
    let mut q = vec![format!("window={}s", a.window.as_secs().max(1))];
    if let Some(d) = a.latency_objective {
        q.push(format!("latencyObjectiveMs={}", d.as_secs_f64() * 1e3));
    }
    if let Some(u) = a.target_utilization {
        q.push(format!("targetUtilization={u}"));
    }
    if let Some(c) = a.cores_per_instance {
        q.push(format!("coresPerInstance={c}"));
    }
    let v: CapacityView = api.get(&format!("/v1/capacity?{}", q.join("&"))).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Format::Table => print!("{}", render(&v)),
    }
    Ok(0)
}
