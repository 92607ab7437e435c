//! The active tracing and access-log sinks, chosen from the snapshot's `Telemetry` resources
//! (`trellis_api::telemetry::select`). A reload prepares the new sinks before anything
//! changes (a log file that cannot be opened refuses the config), keeps the exporter or
//! writer whose settings did not change, and swaps them in with the snapshot. Counts survive
//! swaps, so the metrics stay monotonic.

use crate::accesslog::{self, AccessLog};
use crate::otlp::{self, Exporter};
use crate::snapshot::Snapshot;
use crate::trace::Formats;
use arc_swap::ArcSwap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use trellis_api::Resource;
use trellis_api::telemetry::{self as api, OtlpProtocol, Propagation};

/// A config whose telemetry cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("Telemetry accessLog.path {path}: cannot be opened: {source}")]
pub struct Error {
    /// The path.
    pub path: String,
    /// Why.
    pub source: std::io::Error,
}

/// Tracing as configured for this proxy.
#[derive(Debug)]
pub struct Tracer {
    /// Share of new traces recorded, 0.0-1.0.
    pub rate: f64,
    /// Formats written when a request came with none.
    pub formats: Formats,
    exporter: Exporter,
    settings: (api::Tracing, Vec<otlp::KeyValue>),
}

impl Tracer {
    /// Hands a finished span to the exporter (never waits).
    pub fn record(&self, span: otlp::Span) {
        self.exporter.record(span);
    }
}

/// The access log as configured for this proxy.
#[derive(Debug)]
pub struct Log {
    log: AccessLog,
    settings: api::AccessLog,
}

impl Log {
    /// Queues a line (never waits).
    pub fn record(&self, entry: accesslog::Entry) {
        self.log.record(entry);
    }
}

/// What requests record into; both `None` when nothing is configured.
#[derive(Debug, Default)]
pub struct Sinks {
    /// Tracing, when enabled.
    pub tracer: Option<Tracer>,
    /// Access log, when enabled.
    pub log: Option<Log>,
}

impl Sinks {
    /// Whether a request has anything to do here.
    pub fn active(&self) -> bool {
        self.tracer.is_some() || self.log.is_some()
    }
}

/// The proxy's telemetry: the active sinks and the counts of everything they did.
#[derive(Debug, Default)]
pub struct Telemetry {
    active: ArcSwap<Sinks>,
    spans: Arc<otlp::Counts>,
    lines: Arc<accesslog::Counts>,
}

impl Telemetry {
    /// The active sinks (lock-free).
    pub fn sinks(&self) -> arc_swap::Guard<Arc<Sinks>> {
        self.active.load()
    }

    /// The active sinks, to keep past the current request step.
    pub fn sinks_full(&self) -> Arc<Sinks> {
        self.active.load_full()
    }

    /// Swaps in sinks made by [`prepare`](Self::prepare).
    pub fn commit(&self, sinks: Sinks) {
        self.active.store(Arc::new(sinks));
    }

    /// The sinks `snap` asks for, reusing the active exporter and writer whose settings are
    /// unchanged. Starts new ones (on the current runtime); nothing changes until `commit`.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Sinks, Error> {
        let current = self.active.load();
        let (tracing, log, resource) = chosen(&snap.resources);
        let tracer = match tracing.filter(|t| t.enabled) {
            None => None,
            Some(t) => {
                let settings = (t.clone(), resource);
                let exporter = match &current.tracer {
                    Some(c) if c.settings == settings => c.exporter.clone(),
                    _ => Exporter::start_counted(export_config(&settings.0, &settings.1), {
                        self.spans.clone()
                    }),
                };
                Some(Tracer {
                    rate: t.sampling_percent / 100.0,
                    formats: formats(&t.propagation),
                    exporter,
                    settings,
                })
            }
        };
        let log = match log.filter(|l| l.enabled) {
            None => None,
            Some(l) => {
                let log = match &current.log {
                    Some(c) if &c.settings == l => c.log.clone(),
                    _ => {
                        let out: Box<dyn std::io::Write + Send> = if l.path == "stdout" {
                            Box::new(std::io::stdout())
                        } else {
                            Box::new(
                                std::fs::OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(&l.path)
                                    .map_err(|source| Error {
                                        path: l.path.clone(),
                                        source,
                                    })?,
                            )
                        };
                        AccessLog::start_counted(
                            out,
                            l.fields.clone(),
                            l.queue_size as usize,
                            self.lines.clone(),
                        )
                        .map_err(|source| Error {
                            path: l.path.clone(),
                            source,
                        })?
                    }
                };
                Some(Log {
                    log,
                    settings: l.clone(),
                })
            }
        };
        Ok(Sinks { tracer, log })
    }

    /// The `trellis_tracing_spans_total` and `trellis_access_log_lines_total` collector.
    pub fn collector(self: &Arc<Self>) -> Box<dyn prometheus_client::collector::Collector> {
        Box::new(Counters(self.clone()))
    }
}

/// Reads the counts at scrape time.
#[derive(Debug)]
struct Counters(Arc<Telemetry>);

impl prometheus_client::collector::Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let spans = [
            ("exported", t.spans.exported.load(Ordering::Relaxed)),
            (
                "dropped_queue_full",
                t.spans.dropped_queue_full.load(Ordering::Relaxed),
            ),
            (
                "dropped_export_failed",
                t.spans.dropped_export_failed.load(Ordering::Relaxed),
            ),
        ];
        let lines = [
            ("written", t.lines.written.load(Ordering::Relaxed)),
            ("dropped", t.lines.dropped.load(Ordering::Relaxed)),
            ("failed", t.lines.failed.load(Ordering::Relaxed)),
        ];
        for (name, help, values) in [
            (
                "tracing_spans",
                "Spans by what became of them: exported, dropped_queue_full (the collector is slow or gone), dropped_export_failed",
                &spans,
            ),
            (
                "access_log_lines",
                "Access log lines by what became of them: written, dropped (the disk is slow), failed (write errors)",
                &lines,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (result, n) in values {
                let labels = [("result", *result)];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The blocks of the `Telemetry` resources that apply to the proxy in `resources`, and its
/// resource attributes.
fn chosen(
    resources: &[Resource],
) -> (
    Option<&api::Tracing>,
    Option<&api::AccessLog>,
    Vec<otlp::KeyValue>,
) {
    let Some(proxy) = resources.iter().find_map(|r| match r {
        Resource::Proxy(p) => Some(p),
        _ => None,
    }) else {
        return (None, None, vec![]);
    };
    let ns = &proxy.metadata.namespace;
    let service = proxy.spec.inbound.iter().find_map(|l| l.service.as_deref());
    let all = resources.iter().filter_map(|r| match r {
        Resource::Telemetry(t) => Some((t.metadata.namespace.as_str(), &t.spec)),
        _ => None,
    });
    let (tracing, log) = api::select(all, ns, service);
    // A client-only proxy is known by its own name.
    let resource = vec![
        otlp::attr("service.name", service.unwrap_or(&proxy.metadata.name)),
        otlp::attr("service.namespace", ns.as_str()),
        otlp::attr("service.instance.id", proxy.metadata.name.as_str()),
    ];
    (tracing, log, resource)
}

fn export_config(t: &api::Tracing, resource: &[otlp::KeyValue]) -> otlp::ExportConfig {
    otlp::ExportConfig {
        // Validation required it when tracing is enabled.
        endpoint: t.collector.clone().unwrap_or_default(),
        protocol: match t.protocol {
            OtlpProtocol::Grpc => otlp::Protocol::Grpc,
            OtlpProtocol::HttpProtobuf => otlp::Protocol::HttpProtobuf,
        },
        queue: t.queue_size as usize,
        batch: t.batch_size as usize,
        interval: t.flush_interval.get(),
        timeout: std::time::Duration::from_secs(10),
        resource: resource.to_vec(),
    }
}

fn formats(p: &[Propagation]) -> Formats {
    Formats {
        w3c: p.contains(&Propagation::W3c),
        b3_single: p.contains(&Propagation::B3),
        b3_multi: p.contains(&Propagation::B3Multi),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        trellis_api::parse_documents("t.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|r| r.value)
            .collect()
    }

    const PROXY: &str = "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: orders-1, namespace: shop}
spec:
  inbound: [{name: app, address: 127.0.0.1:0, forwardTo: 127.0.0.1:1, service: orders}]
";

    #[test]
    fn the_proxys_service_and_namespace_choose_its_telemetry() {
        let yaml = format!(
            "{PROXY}---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh}}
spec:
  tracing: {{collector: 'http://127.0.0.1:4317', samplingPercent: 5, propagation: [b3multi]}}
  accessLog: {{path: stdout}}
---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: quiet, namespace: shop}}
spec:
  service: orders
  accessLog: {{enabled: false}}
"
        );
        let rs = resources(&yaml);
        let (t, l, res) = chosen(&rs);
        assert_eq!(t.unwrap().sampling_percent, 5.0);
        assert!(!l.unwrap().enabled, "the service's block wins");
        let names: Vec<String> = res
            .iter()
            .map(|kv| format!("{}={:?}", kv.key, kv.value.as_ref().unwrap().value))
            .collect();
        assert_eq!(
            names,
            [
                "service.name=Some(String(\"orders\"))",
                "service.namespace=Some(String(\"shop\"))",
                "service.instance.id=Some(String(\"orders-1\"))"
            ]
        );
        assert_eq!(
            formats(&t.unwrap().propagation),
            Formats {
                b3_multi: true,
                ..Formats::default()
            }
        );
    }
}
