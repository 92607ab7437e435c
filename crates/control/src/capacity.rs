//! The capacity report (`trellis report capacity`, `GET /v1/capacity`, and
//! `trellis_capacity_*` on `/metrics`): per service, the load its sidecars saw, the CPU and
//! memory of the sidecars and their apps, and how many instances the service needs for a
//! latency objective at a target utilization, with the arithmetic shown.
//!
//! The model (docs/operations.md, "Capacity"): CPU per request, measured, times the request
//! rate, over what one instance may use (its cores × the target utilization), rounded up;
//! raised when the observed p99 exceeds the objective at the current load. Everything here
//! is pure, over the fleet view and the proxies' usage samples.

use crate::fleet::{Reporter, StatsView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use trellis_api::wire;

/// Fewer requests than this in the window say nothing about p99: latency is not judged.
pub const MIN_LATENCY_REQUESTS: u64 = 100;

/// A latency breach raises the count at most by this factor per recommendation (like an
/// autoscaler's scale-up limit), since latency does not fall linearly with instances.
pub const MAX_LATENCY_FACTOR: f64 = 2.0;

/// The window of the capacity report and metric.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// What the recommendation aims for.
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    /// p99 latency the service must stay under.
    pub latency_objective: Duration,
    /// The share of an instance's CPU it may use (0–1], headroom for bursts.
    pub target_utilization: f64,
    /// CPUs of one instance; default: what its sidecars report (the host's parallelism).
    pub cores_per_instance: Option<f64>,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            latency_objective: Duration::from_millis(200),
            target_utilization: 0.6,
            cores_per_instance: None,
        }
    }
}

impl Objective {
    /// Checks the bounds, naming the parameter at fault.
    pub fn check(&self) -> Result<(), String> {
        if self.latency_objective.is_zero() {
            return Err("latencyObjectiveMs: must be above 0".into());
        }
        let u = self.target_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(format!("targetUtilization {u}: between 0 (excluded) and 1"));
        }
        if let Some(c) = self.cores_per_instance
            && !(c > 0.0 && c.is_finite())
        {
            return Err(format!("coresPerInstance {c}: must be above 0"));
        }
        Ok(())
    }
}

/// One proxy's CPU and memory over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// CPU cores the sidecar used on average; `None` with fewer than two samples.
    pub sidecar_cores: Option<f64>,
    /// CPU cores its app used on average; `None` without an app or two samples of it.
    pub app_cores: Option<f64>,
    /// The sidecar's resident memory at the last sample.
    pub sidecar_rss_bytes: u64,
    /// The app's resident memory at the last sample (0 without an app).
    pub app_rss_bytes: u64,
    /// CPUs the host gives the sidecar.
    pub cpu_cores: u32,
}

impl Usage {
    /// Rates from samples `(seconds since the first, sample)` in time order: the difference
    /// of the cumulative CPU seconds between the first and the last, over the time between
    /// them (never negative: an app's helper that exits takes its CPU time with it).
    pub fn from_samples(samples: &[(f64, &wire::Usage)]) -> Option<Usage> {
        let (t1, last) = samples.last()?;
        let (t0, first) = samples.first()?;
        let dt = t1 - t0;
        let rate = |a: f64, b: f64| (dt > 0.0).then(|| ((b - a) / dt).max(0.0));
        let app = first.app_processes > 0 && last.app_processes > 0;
        Some(Usage {
            sidecar_cores: rate(first.sidecar_cpu_seconds, last.sidecar_cpu_seconds),
            app_cores: if app {
                rate(first.app_cpu_seconds, last.app_cpu_seconds)
            } else {
                None
            },
            sidecar_rss_bytes: last.sidecar_rss_bytes,
            app_rss_bytes: if last.app_processes > 0 {
                last.app_rss_bytes
            } else {
                0
            },
            cpu_cores: last.cpu_cores,
        })
    }
}

/// What one service's sidecars observed over the window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Load {
    /// Instances: sidecars of the service that reported.
    pub instances: usize,
    /// Requests its sidecars served in the window.
    pub requests: u64,
    /// Requests per second, all instances.
    pub rps: f64,
    /// Share of failed requests (5xx, failed gRPC calls); absent without requests.
    pub error_rate: Option<f64>,
    /// Median latency at the callee's sidecar, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// CPU cores its sidecars used, all instances.
    pub sidecar_cores: Option<f64>,
    /// CPU cores its apps used, all instances (extrapolated from those measured).
    pub app_cores: Option<f64>,
    /// Instances whose app CPU was measured (started by `trellis run`).
    pub apps_measured: usize,
    /// Resident memory of its sidecars, all instances, bytes.
    pub sidecar_memory_bytes: u64,
    /// Resident memory of its apps, all instances, bytes.
    pub app_memory_bytes: u64,
    /// CPUs per instance as reported (the smallest).
    pub reported_cores_per_instance: Option<u32>,
}

/// The recommendation for one service.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// CPU used over CPU available (instances × cores per instance).
    pub utilization: Option<f64>,
    /// CPU milliseconds per request (app and sidecar).
    pub cpu_ms_per_request: Option<f64>,
    /// Cores per instance the arithmetic used.
    pub cores_per_instance: f64,
    /// Instances the CPU needs at the target utilization.
    pub instances_for_cpu: Option<u64>,
    /// Instances the latency objective asks for (only when p99 exceeds it).
    pub instances_for_latency: Option<u64>,
    /// The recommendation: the larger of the two, at least one.
    pub recommended_instances: u64,
    /// How it was derived, for people.
    pub arithmetic: String,
}

/// One row of the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceCapacity {
    /// `namespace/name`.
    pub service: String,
    /// What was observed.
    #[serde(flatten)]
    pub load: Load,
    /// What follows from it.
    #[serde(flatten)]
    pub recommendation: Recommendation,
}

/// The objective as the report shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectiveView {
    /// p99 objective, milliseconds.
    pub latency_objective_ms: f64,
    /// Target utilization (0–1].
    pub target_utilization: f64,
    /// Cores per instance when given; else each service's reported cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores_per_instance: Option<f64>,
    /// The window the observations cover, seconds.
    pub window_seconds: f64,
}

/// The answer of `GET /v1/capacity`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityView {
    /// What the recommendations aim for.
    pub objective: ObjectiveView,
    /// Per service.
    pub services: Vec<ServiceCapacity>,
}

/// Rounds up, forgiving float noise (1.2 / 0.6 is 2, not 3).
fn ceil(x: f64) -> u64 {
    (x - 1e-9).ceil().max(0.0) as u64
}

/// The recommendation for `load` under `o`. Pure.
pub fn recommend(load: &Load, o: &Objective) -> Recommendation {
    let n = load.instances.max(1);
    let k = o
        .cores_per_instance
        .or(load.reported_cores_per_instance.map(f64::from))
        .unwrap_or(1.0)
        .max(f64::MIN_POSITIVE);
    let u = o.target_utilization;
    let used = match (load.app_cores, load.sidecar_cores) {
        (None, None) => None,
        (a, s) => Some(a.unwrap_or(0.0) + s.unwrap_or(0.0)),
    };
    let mut lines = Vec::new();
    let mut r = Recommendation {
        cores_per_instance: k,
        ..Recommendation::default()
    };
    match used {
        Some(used) => {
            r.utilization = Some(used / (n as f64 * k));
            let x = used / (k * u);
            let by_cpu = ceil(x).max(1);
            r.instances_for_cpu = Some(by_cpu);
            let parts = format!(
                "{used:.3} cores ({:.3} app + {:.3} sidecar)",
                load.app_cores.unwrap_or(0.0),
                load.sidecar_cores.unwrap_or(0.0)
            );
            if load.rps > 0.0 {
                let per = used / load.rps * 1e3;
                r.cpu_ms_per_request = Some(per);
                lines.push(format!(
                    "cpu: {parts} / {:.1} rps = {per:.3} ms per request; {per:.3} ms × {:.1} rps / ({k} cores × {u} target) = {x:.2} → {by_cpu}",
                    load.rps, load.rps
                ));
            } else {
                lines.push(format!(
                    "cpu: {parts} with no requests; {used:.3} / ({k} cores × {u} target) = {x:.2} → {by_cpu}"
                ));
            }
            if load.apps_measured == 0 {
                lines.push(
                    "app CPU not measured (not started by `trellis run`): the sidecars' alone, so this is a floor".into(),
                );
            } else if load.apps_measured < load.instances {
                lines.push(format!(
                    "app CPU measured on {} of {} instances, extrapolated",
                    load.apps_measured, load.instances
                ));
            }
        }
        None => lines.push(
            "cpu: no usage samples yet (each sidecar reports every 2s; two are needed)".into(),
        ),
    }
    let objective_ms = o.latency_objective.as_secs_f64() * 1e3;
    match load.p99_ms {
        Some(p99) if load.requests < MIN_LATENCY_REQUESTS => lines.push(format!(
            "latency: p99 {p99:.1} ms from {} requests, too few (< {MIN_LATENCY_REQUESTS}) to judge",
            load.requests
        )),
        Some(p99) if p99 > objective_ms => {
            let factor = (p99 / objective_ms).min(MAX_LATENCY_FACTOR);
            let by_latency = ceil(n as f64 * factor).max(n as u64 + 1);
            r.instances_for_latency = Some(by_latency);
            lines.push(format!(
                "latency: p99 {p99:.1} ms > objective {objective_ms:.0} ms at the current load: {n} × min({:.2}, {MAX_LATENCY_FACTOR}) = {:.2} → {by_latency} (at least one more)",
                p99 / objective_ms,
                n as f64 * factor
            ));
            if r.utilization.is_some_and(|x| x < u / 2.0) {
                lines.push(
                    "utilization is low: the latency may come from a dependency or a concurrency limit, which more instances do not fix".into(),
                );
            }
        }
        Some(p99) => lines.push(format!(
            "latency: p99 {p99:.1} ms ≤ objective {objective_ms:.0} ms"
        )),
        None => lines.push("latency: no requests in the window".into()),
    }
    r.recommended_instances = match (r.instances_for_cpu, r.instances_for_latency) {
        (None, None) => {
            lines.push(format!("keeping the current {n}"));
            n as u64
        }
        (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)).max(1),
    };
    lines.push(format!(
        "recommended {} (now {})",
        r.recommended_instances, load.instances
    ));
    r.arithmetic = lines.join("; ");
    r
}

/// Joins the fleet view (requests, latency) with the proxies' usage into per-service loads,
/// and recommends for each. Pure.
pub fn view(
    stats: &StatsView,
    usage: &[(Reporter, Usage)],
    o: &Objective,
    window: Duration,
) -> CapacityView {
    let mut loads: BTreeMap<(String, String), Load> = BTreeMap::new();
    for row in &stats.services {
        let l = loads
            .entry((row.namespace.clone(), row.name.clone()))
            .or_default();
        l.instances = row.proxies;
        l.requests = row.requests;
        l.rps = row.rps;
        l.error_rate = row.success_rate.map(|s| ((1.0 - s) * 1e4).round() / 1e4);
        l.p50_ms = row.p50_ms;
        l.p99_ms = row.p99_ms;
    }
    let mut per: BTreeMap<(String, String), Vec<&Usage>> = BTreeMap::new();
    for (who, u) in usage {
        // A client-only sidecar is no service's instance.
        if !who.service.is_empty() {
            per.entry((who.namespace.clone(), who.service.clone()))
                .or_default()
                .push(u);
        }
    }
    for (key, us) in per {
        let l = loads.entry(key).or_default();
        l.instances = l.instances.max(us.len());
        let sum = |f: fn(&Usage) -> Option<f64>| {
            let v: Vec<f64> = us.iter().filter_map(|u| f(u)).collect();
            (!v.is_empty()).then(|| (v.iter().sum::<f64>(), v.len()))
        };
        l.sidecar_cores = sum(|u| u.sidecar_cores).map(|(s, _)| s);
        if let Some((s, measured)) = sum(|u| u.app_cores) {
            l.apps_measured = measured;
            l.app_cores = Some(s / measured as f64 * l.instances as f64);
        }
        l.sidecar_memory_bytes = us.iter().map(|u| u.sidecar_rss_bytes).sum();
        l.app_memory_bytes = us.iter().map(|u| u.app_rss_bytes).sum();
        l.reported_cores_per_instance = us.iter().map(|u| u.cpu_cores).filter(|c| *c > 0).min();
    }
    CapacityView {
        objective: ObjectiveView {
            latency_objective_ms: o.latency_objective.as_secs_f64() * 1e3,
            target_utilization: o.target_utilization,
            cores_per_instance: o.cores_per_instance,
            window_seconds: window.as_secs_f64(),
        },
        services: loads
            .into_iter()
            .map(|((ns, svc), load)| ServiceCapacity {
                service: format!("{ns}/{svc}"),
                recommendation: recommend(&load, o),
                load,
            })
            .collect(),
    }
}

/// The `trellis_capacity_*` families for `/metrics`, from a fresh registry (so a service
/// that is gone leaves no stale series), in Prometheus text without the final `# EOF`.
pub fn encode_metrics(v: &CapacityView) -> String {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        namespace: String,
        service: String,
    }
    type F = Family<Labels, Gauge<f64, AtomicU64>>;
    let mut registry = prometheus_client::registry::Registry::with_prefix("trellis_capacity");
    let mut family = |name: &str, help: &str| {
        let f = F::default();
        registry.register(name, help, f.clone());
        f
    };
    let recommended = family(
        "recommended_instances",
        "Instances the service needs for the latency objective at the target utilization (trellis report capacity)",
    );
    let instances = family(
        "instances",
        "Instances (sidecars) that reported in the window",
    );
    let utilization = family(
        "utilization",
        "CPU used (apps and sidecars) over CPU available (instances x cores per instance)",
    );
    let cores = family(
        "cpu_cores",
        "CPU cores used by the service's apps and sidecars",
    );
    let rps = family("requests_per_second", "Requests per second served");
    let p99 = family("latency_p99_seconds", "p99 latency at the callee's sidecar");
    let memory = family(
        "memory_bytes",
        "Resident memory of the service's apps and sidecars",
    );
    for s in &v.services {
        let (ns, name) = s.service.split_once('/').unwrap_or(("", &s.service));
        let l = Labels {
            namespace: ns.into(),
            service: name.into(),
        };
        let r = &s.recommendation;
        recommended
            .get_or_create(&l)
            .set(r.recommended_instances as f64);
        instances.get_or_create(&l).set(s.load.instances as f64);
        if let Some(u) = r.utilization {
            utilization.get_or_create(&l).set(u);
        }
        if let (Some(a), Some(b)) = (s.load.app_cores, s.load.sidecar_cores) {
            cores.get_or_create(&l).set(a + b);
        } else if let Some(c) = s.load.app_cores.or(s.load.sidecar_cores) {
            cores.get_or_create(&l).set(c);
        }
        rps.get_or_create(&l).set(s.load.rps);
        if let Some(p) = s.load.p99_ms {
            p99.get_or_create(&l).set(p / 1e3);
        }
        memory
            .get_or_create(&l)
            .set((s.load.app_memory_bytes + s.load.sidecar_memory_bytes) as f64);
    }
    let objective = Gauge::<f64, AtomicU64>::default();
    objective.set(v.objective.latency_objective_ms / 1e3);
    registry.register(
        "latency_objective_seconds",
        "The p99 objective the recommendations aim for",
        objective,
    );
    let target = Gauge::<f64, AtomicU64>::default();
    target.set(v.objective.target_utilization);
    registry.register(
        "target_utilization",
        "The CPU utilization the recommendations aim for",
        target,
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests;
