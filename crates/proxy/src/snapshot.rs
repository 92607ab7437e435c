//! The proxy's immutable, fully resolved config: built once from resources, validated whole,
//! then swapped in atomically. Nothing on the request path resolves a name at request time
//! beyond a hash lookup.

use crate::attach::{Attached, attach};
use crate::balance::{Balancer, Member};
use crate::endpoint::EndpointState;
use crate::filters::{FilterSet, Filters, HeaderEdit, Mirror, PathChange, Redirect, Rewrite};
use crate::metrics::{Metrics, RouteStats};
use crate::packed::Packed;
use crate::route::{
    Created, GrpcMatch, GrpcRoutes, HttpMatch, HttpRoutes, Order, PathMatch, Rule, ValueMatch,
    WeightedBackend, anchored, exact,
};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use trellis_api::mesh::MtlsMode;
use trellis_api::policy::{Algorithm, BackendPolicySpec};
use trellis_api::route::{
    HeaderMatch, HeaderModifier, HttpRouteFilter, PathMatchType, PathModifier, PathModifierType,
    ValueMatchType,
};
use trellis_api::service::AppProtocol;
use trellis_api::{Diagnostic, Diagnostics, Located, Resource};

/// A service's identity: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What the balancer hashes for consistent hashing.
#[derive(Clone, Debug)]
pub enum HashOn {
    /// A request header.
    Header(HeaderName),
    /// A cookie.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
}

/// A backend: one service port and how to reach its endpoints.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name:port`, as shown in metrics.
    pub name: Arc<str>,
    /// Declared protocol of the port.
    pub protocol: Option<AppProtocol>,
    /// Endpoint choice.
    pub balancer: Balancer,
    /// Consistent-hash key.
    pub hash_on: Option<HashOn>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time until response headers; `None` disables.
    pub request_timeout: Option<Duration>,
    /// Pooled connection idle time.
    pub idle_timeout: Duration,
    /// Retries towards this backend (the defaults unless a `BackendPolicy` says otherwise).
    pub retry: Arc<crate::retry::Policy>,
    /// How many retries it may see; kept across reloads while its config stays the same.
    pub budget: Arc<crate::retry::Budget>,
    /// The backend that takes requests while this one has no usable endpoint.
    pub fallback: Option<Fallback>,
    /// Outlier detection; `None` when every trigger is off.
    pub outlier: Option<crate::outlier::Policy>,
    /// Held while deciding an ejection, so the ejection cap holds exactly.
    pub ejecting: std::sync::Mutex<()>,
    /// Active health check of every endpoint, if configured (boxed: most backends have
    /// none, and a mesh-wide view holds thousands).
    pub health_check: Option<Box<trellis_api::health::HealthCheck>>,
    /// Circuit breaker limits, when the backend's policy sets any.
    pub gate: Option<crate::breaker::Gate>,
}

/// A backend's fallback.
#[derive(Debug)]
pub struct Fallback {
    /// The fallback service port.
    pub backend: Arc<Backend>,
    /// Requests it took.
    pub taken: prometheus_client::metrics::counter::Counter,
}

impl Backend {
    /// The fallback step: this backend, or while it has no usable endpoint, the first usable
    /// one along its fallbacks. When none is usable either, this one (its own balancer then
    /// picks the least bad endpoint, or answers that there is none).
    pub fn or_fallback(&self) -> &Backend {
        self.fallback_avoiding(&[]).unwrap_or(self)
    }

    /// The first usable backend along this one's fallbacks, when this one has no usable
    /// endpoint beyond those in `tried`: where a re-attempt goes once this request has
    /// failed on every endpoint that looked usable.
    pub fn fallback_avoiding(&self, tried: &[&EndpointState]) -> Option<&Backend> {
        self.fallback_step(tried, true)
    }

    /// The fallback a first try would take now, counting nothing (for `trellis explain`).
    pub fn fallback_now(&self) -> Option<&Backend> {
        self.fallback_step(&[], false)
    }

    fn fallback_step(&self, tried: &[&EndpointState], count: bool) -> Option<&Backend> {
        match &self.fallback {
            Some(f) if !self.balancer.usable(tried) => {
                let b = f.backend.first_usable(count)?;
                if count {
                    f.taken.inc();
                }
                Some(b)
            }
            _ => None,
        }
    }

    fn first_usable(&self, count: bool) -> Option<&Backend> {
        if self.balancer.usable(&[]) {
            return Some(self);
        }
        let f = self.fallback.as_ref()?;
        let b = f.backend.first_usable(count)?;
        if count {
            f.taken.inc();
        }
        Some(b)
    }
}

/// One port of a service, with the routes attached to it.
#[derive(Debug)]
pub struct PortEntry {
    /// Port number.
    pub port: u16,
    /// The service itself at this port: where traffic goes when no route is attached.
    pub backend: Arc<Backend>,
    /// HTTPRoutes attached (`None` when there are none).
    pub http: Option<HttpRoutes>,
    /// GRPCRoutes attached (`None` when there are none).
    pub grpc: Option<GrpcRoutes>,
    /// Request metrics for the default route (no route attached).
    pub stats: Arc<RouteStats>,
}

/// Where a listener sends traffic.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// Inbound: to the local application.
    Inbound {
        /// The application as a single-endpoint backend.
        app: Arc<Backend>,
        /// Request metrics.
        stats: Arc<RouteStats>,
        /// Whether plaintext from other sidecars is accepted.
        mtls: MtlsMode,
        /// Who may call the application.
        authz: Arc<crate::authz::Authz>,
        /// The application's port (authorization's destination port).
        port: u16,
        /// JSON Web Tokens to verify.
        authn: Arc<crate::jwt::Authn>,
        /// The policy reads requests (paths, methods, headers, tokens): a connection that is
        /// not HTTP is refused, never forwarded as bytes.
        requires_http: bool,
        /// The service's OverloadPolicy: adaptive concurrency with priorities.
        overload: Option<Arc<crate::overload::Gate>>,
    },
    /// Outbound to one service port (resolved when the snapshot is built).
    Service(ServiceKey, u16, Arc<PortEntry>),
    /// Outbound, routed by `Host`.
    HttpProxy,
}

/// A listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Name, for metrics.
    pub name: Arc<str>,
    /// Bound address.
    pub addr: SocketAddr,
    /// Destination.
    pub kind: ListenerKind,
    /// Declared protocol (skips detection).
    pub protocol: Option<AppProtocol>,
}

impl Listener {
    /// `inbound` or `outbound`.
    pub fn direction(&self) -> &'static str {
        match self.kind {
            ListenerKind::Inbound { .. } => "inbound",
            _ => "outbound",
        }
    }
}

/// Proxy-wide settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Wait for a client's first bytes before falling back to TCP.
    pub detect_timeout: Duration,
    /// Drain deadline on shutdown.
    pub drain_timeout: Duration,
    /// Idle time after which an HTTP/1.1 client connection is closed.
    pub client_idle_timeout: Duration,
    /// Connection caps and the timeouts of quiet connections and streams.
    pub bounds: crate::limits::Bounds,
}

/// An endpoint's address and the SPIFFE id it must present (`None`: plaintext).
pub type EndpointKey = (SocketAddr, Option<Arc<str>>);

/// The whole resolved config.
#[derive(Debug)]
pub struct Snapshot {
    /// Monotonic version, bumped on every accepted change.
    pub version: u64,
    /// Where it came from, for `/config`.
    pub source: String,
    /// Proxy-wide settings.
    pub settings: Settings,
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// Service ports, by service.
    pub services: HashMap<ServiceKey, Vec<Arc<PortEntry>>>,
    /// Host names (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`) to services.
    /// A service's four names share one key: a mesh-wide view has thousands of them.
    pub hosts: HashMap<Box<str>, Arc<ServiceKey>>,
    /// Every endpoint's shared state, by address and the identity it must present: two
    /// services listing one address with different identities never share connections.
    pub endpoints: HashMap<EndpointKey, Arc<EndpointState>>,
    /// Circuit breaker counters, by backend name: like endpoint state, carried over to the
    /// next snapshot for backends that remain.
    pub breakers: HashMap<Arc<str>, Arc<crate::breaker::Breaker>>,
    /// Rate limits by where they are enforced; their buckets are carried over like breakers.
    pub limits: crate::ratelimit::Limits,
    /// Adaptive concurrency limiters, by OverloadPolicy: carried over like breakers.
    pub overloads: HashMap<Arc<str>, Arc<crate::overload::State>>,
    /// The resources read after the build: the `Proxy` (this workload) and the `Telemetry`
    /// resources (the sinks).
    pub resources: Vec<Resource>,
    /// Every resource as given, as compact JSON, for `/config`, in order. Kept as text, not
    /// values: a config of 3,000 resources is ~1.9 MB of JSON and ~6 MB of parsed values.
    /// Resources from the control plane are a range of the held set's packed texts
    /// ([`Located::text`]), shared, not copied, and inflated only while `/config` renders:
    /// the view is not kept twice, and ~110 KB instead of ~1.9 MB.
    pub config: Vec<ConfigText>,
}

/// Some of the resources `/config` shows, as compact JSON.
#[derive(Clone, Debug)]
pub enum ConfigText {
    /// One resource's text, of its own (the local ones and placeholders).
    Own(Arc<str>),
    /// Texts `range` of a packed set (a run of resources from the control plane).
    Packed(Arc<Packed>, Range<usize>),
}

impl From<&str> for ConfigText {
    fn from(text: &str) -> ConfigText {
        ConfigText::Own(text.into())
    }
}

impl Snapshot {
    /// The port entry for `service` and `port` (the only port when `port` is `None`).
    pub fn port(&self, service: &ServiceKey, port: Option<u16>) -> Option<&PortEntry> {
        let ports = self.services.get(service)?;
        match port {
            Some(p) => ports.iter().find(|e| e.port == p).map(|e| &**e),
            None if ports.len() == 1 => ports.first().map(|e| &**e),
            None => None,
        }
    }

    /// An empty snapshot (no listeners), used before any config is accepted.
    pub fn empty() -> Snapshot {
        // The API's defaults, so that they are written down once.
        let spec = trellis_api::proxy::ProxySpec::default();
        Snapshot {
            version: 0,
            source: String::new(),
            settings: Settings {
                admin: spec
                    .admin
                    .address
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9990))),
                detect_timeout: spec.detect_timeout.get(),
                drain_timeout: spec.drain_timeout.get(),
                client_idle_timeout: spec.client_idle_timeout.get(),
                bounds: crate::limits::Bounds::from_spec(&spec),
            },
            listeners: vec![],
            services: HashMap::new(),
            hosts: HashMap::new(),
            endpoints: HashMap::new(),
            breakers: HashMap::new(),
            limits: Default::default(),
            overloads: HashMap::new(),
            resources: vec![],
            config: vec![],
        }
    }

    /// Validates `resources` as a whole and compiles them. Endpoint state (load counters,
    /// pooled connections) is carried over from `previous` for endpoints that remain.
    pub fn build(
        resources: &[Located<Resource>],
        version: u64,
        source: &str,
        previous: Option<&Snapshot>,
        shared: &crate::Shared,
    ) -> Result<Snapshot, Diagnostics> {
        let metrics = &shared.metrics;
        trellis_api::validate(resources)?;
        let proxies: Vec<_> = resources
            .iter()
            .filter_map(|r| match &r.value {
                Resource::Proxy(p) => Some((r, p)),
                _ => None,
            })
            .collect();
        let (proxy_loc, proxy) = match proxies.as_slice() {
            [one] => *one,
            [] => {
                return Err(Diagnostics(vec![Diagnostic {
                    file: source.to_string(),
                    line: 0,
                    field: "kind".into(),
                    message: "a proxy config needs exactly one `kind: Proxy` resource, found none"
                        .into(),
                }]));
            }
            [_, second, ..] => {
                return Err(Diagnostics(vec![second.0.diagnostic(
                    "kind",
                    "a proxy config needs exactly one `kind: Proxy` resource",
                )]));
            }
        };
        let spec = &proxy.spec;
        let mut b = Builder {
            previous,
            metrics,
            session_key: &shared.session_key,
            mesh: shared.mesh.clone(),
            endpoints: HashMap::new(),
            breakers: HashMap::new(),
            faults: HashMap::new(),
            backends: HashMap::new(),
            policies: HashMap::new(),
            services: HashMap::new(),
            defaults: Defaults {
                connect: spec.connect_timeout.get(),
                request: spec.request_timeout.non_zero(),
                idle: spec.idle_timeout.get(),
            },
            locality: crate::locality::Locality::new(
                spec.locality.region.as_deref(),
                spec.locality.cluster.as_deref(),
                spec.locality.zone.as_deref(),
            ),
        };
        for r in resources {
            match &r.value {
                Resource::Service(s) => {
                    b.services
                        .insert(key(&s.metadata.namespace, &s.metadata.name), &s.spec);
                }
                Resource::BackendPolicy(p) => {
                    let t = &p.spec.target_ref;
                    b.policies.insert(
                        key(
                            t.namespace.as_deref().unwrap_or(&p.metadata.namespace),
                            &t.name,
                        ),
                        &p.spec,
                    );
                }
                Resource::FaultInjection(f) => {
                    b.faults.insert(
                        key(&f.metadata.namespace, &f.metadata.name),
                        Arc::new(crate::fault::Fault::new(&f.spec)),
                    );
                }
                _ => {}
            }
        }

        // Every service port gets an entry; routes attach to them below.
        let mut services: HashMap<ServiceKey, Vec<PortEntry>> = HashMap::new();
        let mut hosts = HashMap::new();
        let mut service_keys: Vec<_> = b.services.keys().cloned().collect();
        service_keys.sort();
        for k in &service_keys {
            let ports: Vec<u16> = b.services[k].ports.iter().map(|p| p.port).collect();
            let mut entries = Vec::new();
            for port in ports {
                let backend = b.backend(k, port);
                let stats = metrics.route_stats("outbound", &crate::decide::DEFAULT, &backend.name);
                entries.push(PortEntry {
                    port,
                    backend,
                    http: None,
                    grpc: None,
                    stats,
                });
            }
            services.insert(k.clone(), entries);
            let (n, ns) = (&k.name, &k.namespace);
            let shared = Arc::new(k.clone());
            for h in [
                n.clone(),
                format!("{n}.{ns}"),
                format!("{n}.{ns}.svc"),
                format!("{n}.{ns}.svc.cluster.local"),
            ] {
                hosts
                    .entry(h.into_boxed_str())
                    .or_insert_with(|| shared.clone());
            }
        }

        // Routes: each rule's matches on the ports its parents name, for this proxy's
        // namespace (attach.rs); each port's table sorted by precedence (route.rs).
        let client_ns = &proxy.metadata.namespace;
        let mut http_attach: Attached<HttpMatch> = HashMap::new();
        let mut grpc_attach: Attached<GrpcMatch> = HashMap::new();
        for r in resources {
            let (Resource::HttpRoute(_) | Resource::GrpcRoute(_)) = &r.value else {
                continue;
            };
            let m = r.value.metadata();
            let ns = &m.namespace;
            let order = |rule| Order {
                // Validation refused a malformed time.
                created: m
                    .created()
                    .ok()
                    .flatten()
                    .map_or(Created::Unknown, Created::At),
                route: format!("{ns}/{}", m.name).into(),
                rule,
                index: 0,
            };
            let at = |i: usize| {
                move |e: String| Diagnostics(vec![r.diagnostic(&format!("spec.rules[{i}]"), e)])
            };
            match &r.value {
                Resource::HttpRoute(route) => {
                    let parents =
                        crate::attach::parents(&b.services, ns, client_ns, &route.spec.parent_refs);
                    if parents.is_empty() {
                        continue;
                    }
                    for (i, rule) in route.spec.rules.iter().enumerate() {
                        let compiled = Arc::new(b.rule(
                            ns,
                            &m.name,
                            i,
                            rule.name.as_deref(),
                            &rule.filters,
                            &rule.backend_refs,
                            rule.timeouts.as_ref(),
                            rule.retry.as_ref(),
                            rule.session_persistence.as_ref(),
                            r,
                        )?);
                        attach(
                            &mut http_attach,
                            &parents,
                            &rule.matches,
                            &compiled,
                            &order(i),
                            |m| compile_http_match(m).map_err(at(i)),
                        )?;
                    }
                }
                Resource::GrpcRoute(route) => {
                    let parents =
                        crate::attach::parents(&b.services, ns, client_ns, &route.spec.parent_refs);
                    if parents.is_empty() {
                        continue;
                    }
                    for (i, rule) in route.spec.rules.iter().enumerate() {
                        let compiled = Arc::new(b.rule(
                            ns,
                            &m.name,
                            i,
                            rule.name.as_deref(),
                            &rule.filters,
                            &rule.backend_refs,
                            rule.timeouts.as_ref(),
                            None,
                            rule.session_persistence.as_ref(),
                            r,
                        )?);
                        attach(
                            &mut grpc_attach,
                            &parents,
                            &rule.matches,
                            &compiled,
                            &order(i),
                            |m| compile_grpc_match(m).map_err(at(i)),
                        )?;
                    }
                }
                _ => unreachable!("filtered to routes"),
            }
        }
        crate::attach::prefer_consumers(&mut http_attach, &mut grpc_attach);
        for ((svc, port), entries) in http_attach {
            if let Some(e) = services
                .get_mut(&svc)
                .and_then(|ps| ps.iter_mut().find(|p| p.port == port))
            {
                e.http = Some(HttpRoutes::new(
                    entries
                        .into_iter()
                        .map(|c| (c.m, c.rule, c.order))
                        .collect(),
                ));
            }
        }
        for ((svc, port), entries) in grpc_attach {
            if let Some(e) = services
                .get_mut(&svc)
                .and_then(|ps| ps.iter_mut().find(|p| p.port == port))
            {
                e.grpc = Some(GrpcRoutes::new(
                    entries
                        .into_iter()
                        .map(|c| (c.m, c.rule, c.order))
                        .collect(),
                ));
            }
        }

        // Routes are attached: freeze the port entries so listeners can point at them.
        let services: HashMap<ServiceKey, Vec<Arc<PortEntry>>> = services
            .into_iter()
            .map(|(k, ports)| (k, exact(ports.into_iter().map(Arc::new))))
            .collect();

        let mut listeners = Vec::new();
        let mut overloads = HashMap::new();
        for l in &spec.inbound {
            let app: SocketAddr = l.forward_to.parse().map_err(|_| {
                Diagnostics(vec![proxy_loc.diagnostic("spec.inbound", "bad forwardTo")])
            })?;
            let state = b.endpoint(app, None);
            let mtls = mtls_mode(resources, &proxy.metadata.namespace, l.service.as_deref());
            let authz = Arc::new(
                authz_for(resources, &proxy.metadata.namespace, l.service.as_deref())
                    .map_err(|e| Diagnostics(vec![proxy_loc.diagnostic("spec.inbound", e)]))?,
            );
            let authn = Arc::new(
                authn_for(
                    resources,
                    &proxy.metadata.namespace,
                    l.service.as_deref(),
                    &shared.jwks,
                )
                .map_err(|e| Diagnostics(vec![proxy_loc.diagnostic("spec.inbound", e)]))?,
            );
            let requires_http = crate::authz::requires_http(&authz, &authn, app.port());
            let overload = crate::overload::gate_for(
                resources,
                &proxy.metadata.namespace,
                l.service.as_deref(),
                previous.map(|p| &p.overloads),
                &mut overloads,
                &metrics.concurrency,
            )
            .map_err(|e| Diagnostics(vec![proxy_loc.diagnostic("spec.inbound", e)]))?;
            // The listener's own declaration, else its service port's `appProtocol`: a port
            // declared HTTP never falls back to TCP.
            let protocol = l.protocol.or_else(|| {
                let svc = b
                    .services
                    .get(&key(&proxy.metadata.namespace, l.service.as_deref()?))?;
                inbound_service_port(&svc.ports, l.service_port, app.port())?.app_protocol
            });
            let backend = Arc::new(Backend {
                name: format!("inbound/{}", l.name).into(),
                protocol,
                balancer: Balancer::new(
                    Algorithm::RoundRobin,
                    vec![Member {
                        state,
                        weight: 1,
                        locality: Default::default(),
                    }],
                    1.25,
                    Duration::from_secs(10),
                ),
                hash_on: None,
                connect_timeout: b.defaults.connect,
                request_timeout: b.defaults.request,
                idle_timeout: b.defaults.idle,
                retry: Arc::default(),
                budget: Arc::new(crate::retry::Budget::new(
                    &Default::default(),
                    Instant::now(),
                )),
                fallback: None,
                // One endpoint: nothing to eject it in favour of.
                outlier: None,
                ejecting: Default::default(),
                health_check: None,
                gate: None,
            });
            listeners.push(Listener {
                name: l.name.as_str().into(),
                addr: l.address.parse().map_err(|_| {
                    Diagnostics(vec![proxy_loc.diagnostic("spec.inbound", "bad address")])
                })?,
                kind: ListenerKind::Inbound {
                    stats: metrics.route_stats("inbound", &crate::decide::INBOUND, &backend.name),
                    app: backend,
                    mtls,
                    authz,
                    port: app.port(),
                    authn,
                    requires_http,
                    overload,
                },
                protocol,
            });
        }
        for l in &spec.outbound {
            let kind = match &l.service {
                Some(t) => {
                    let k = key(
                        t.namespace.as_deref().unwrap_or(&proxy.metadata.namespace),
                        &t.name,
                    );
                    let ports = &services[&k];
                    let port = t.port.unwrap_or(ports[0].port);
                    let entry =
                        ports
                            .iter()
                            .find(|e| e.port == port)
                            .cloned()
                            .ok_or_else(|| {
                                Diagnostics(vec![proxy_loc.diagnostic(
                                    "spec.outbound",
                                    format!("Service {} has no port {port}", k.name),
                                )])
                            })?;
                    ListenerKind::Service(k, port, entry)
                }
                None => ListenerKind::HttpProxy,
            };
            let declared = match &kind {
                ListenerKind::Service(k, port, _) => b.services[k]
                    .ports
                    .iter()
                    .find(|p| p.port == *port)
                    .and_then(|p| p.app_protocol),
                _ => None,
            };
            listeners.push(Listener {
                name: l.name.as_str().into(),
                addr: l.address.parse().map_err(|_| {
                    Diagnostics(vec![proxy_loc.diagnostic("spec.outbound", "bad address")])
                })?,
                kind,
                protocol: l.protocol.or(declared),
            });
        }
        let limits = crate::ratelimit::Limits::build(
            resources,
            &proxy.metadata.namespace,
            spec,
            previous.map(|p| &p.limits),
            &shared.globals,
            metrics,
        );
        Ok(Snapshot {
            version,
            source: source.to_string(),
            settings: Settings {
                admin: spec.admin.address.parse().map_err(|_| {
                    Diagnostics(vec![
                        proxy_loc.diagnostic("spec.admin.address", "bad address"),
                    ])
                })?,
                detect_timeout: spec.detect_timeout.get(),
                drain_timeout: spec.drain_timeout.get(),
                client_idle_timeout: spec.client_idle_timeout.get(),
                bounds: crate::limits::Bounds::from_spec(spec),
            },
            listeners,
            services,
            hosts,
            endpoints: b.endpoints,
            breakers: b.breakers,
            limits,
            overloads,
            resources: resources
                .iter()
                .filter(|r| matches!(r.value, Resource::Proxy(_) | Resource::Telemetry(_)))
                .map(|r| r.value.clone())
                .collect(),
            config: config_json(resources),
        })
    }
}

/// Each resource as compact JSON: the packed text it arrived as (consecutive ones as one
/// range), else serialized.
fn config_json(resources: &[Located<Resource>]) -> Vec<ConfigText> {
    let mut out: Vec<ConfigText> = Vec::new();
    for r in resources {
        let packed = r
            .text()
            .and_then(|(store, i)| Some((store.clone().downcast::<Packed>().ok()?, i)));
        match (packed, out.last_mut()) {
            (Some((set, i)), Some(ConfigText::Packed(last, range)))
                if Arc::ptr_eq(&set, last) && range.end == i =>
            {
                range.end += 1;
            }
            (Some((set, i)), _) => out.push(ConfigText::Packed(set, i..i + 1)),
            (None, _) => out.push(ConfigText::Own(r.value.to_json().into())),
        }
    }
    out.shrink_to_fit();
    out
}

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// The port of its service an inbound listener serves: the one named, else the one equal to
/// the application's port, else the only one.
fn inbound_service_port(
    ports: &[trellis_api::service::ServicePort],
    named: Option<u16>,
    app_port: u16,
) -> Option<&trellis_api::service::ServicePort> {
    let find = |n: u16| ports.iter().find(|p| p.port == n);
    named
        .and_then(find)
        .or_else(|| find(app_port))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
}

/// The mutual TLS mode of an inbound listener: its service's, else its namespace's
/// `MeshConfig`, else the `default` namespace's (mesh-wide), else permissive.
fn mtls_mode(resources: &[Located<Resource>], namespace: &str, service: Option<&str>) -> MtlsMode {
    let by_service = service.and_then(|name| {
        resources.iter().find_map(|r| match &r.value {
            Resource::Service(s)
                if s.metadata.name == name && s.metadata.namespace == namespace =>
            {
                s.spec.mtls.as_ref().map(|m| m.mode)
            }
            _ => None,
        })
    });
    let by_namespace = |ns: &str| {
        resources.iter().find_map(|r| match &r.value {
            Resource::MeshConfig(m) if m.metadata.namespace == ns => Some(m.spec.mtls.mode),
            _ => None,
        })
    };
    by_service
        .or_else(|| by_namespace(namespace))
        .or_else(|| by_namespace(trellis_api::meta::DEFAULT_NAMESPACE))
        .unwrap_or_default()
}

/// The `RequestAuthentication`s of the namespace that target the listener's service (or no
/// service), compiled.
fn authn_for(
    resources: &[Located<Resource>],
    namespace: &str,
    service: Option<&str>,
    cache: &crate::jwt::JwksCache,
) -> Result<crate::jwt::Authn, String> {
    let specs: Vec<&trellis_api::authn::RequestAuthenticationSpec> = resources
        .iter()
        .filter_map(|r| match &r.value {
            Resource::RequestAuthentication(a)
                if a.metadata.namespace == namespace
                    && a.spec
                        .target_ref
                        .as_ref()
                        .is_none_or(|t| Some(t.name.as_str()) == service) =>
            {
                Some(&a.spec)
            }
            _ => None,
        })
        .collect();
    crate::jwt::compile(&specs, cache)
}

/// The authorization an inbound listener enforces: the namespace's policies that target its
/// service (or no service), and the namespace's (else the mesh-wide) default.
fn authz_for(
    resources: &[Located<Resource>],
    namespace: &str,
    service: Option<&str>,
) -> Result<crate::authz::Authz, String> {
    let policies: Vec<(String, &trellis_api::authz::AuthorizationPolicySpec)> = resources
        .iter()
        .filter_map(|r| match &r.value {
            Resource::AuthorizationPolicy(p)
                if p.metadata.namespace == namespace
                    && p.spec
                        .target_ref
                        .as_ref()
                        .is_none_or(|t| Some(t.name.as_str()) == service) =>
            {
                Some((
                    format!("{}/{}", p.metadata.namespace, p.metadata.name),
                    &p.spec,
                ))
            }
            _ => None,
        })
        .collect();
    let mesh = |ns: &str| {
        resources.iter().find_map(|r| match &r.value {
            Resource::MeshConfig(m) if m.metadata.namespace == ns => Some((
                m.spec.authorization.clone(),
                format!("MeshConfig {ns}/{}", m.metadata.name),
            )),
            _ => None,
        })
    };
    let (defaults, name) = mesh(namespace)
        .or_else(|| mesh(trellis_api::meta::DEFAULT_NAMESPACE))
        .unwrap_or_else(|| (Default::default(), "default".into()));
    crate::authz::Authz::new(&policies, defaults.default_action, defaults.mode, &name)
}

struct Defaults {
    connect: Duration,
    request: Option<Duration>,
    idle: Duration,
}

struct Builder<'a> {
    previous: Option<&'a Snapshot>,
    metrics: &'a Metrics,
    session_key: &'a crate::session::Key,
    mesh: crate::tls::MeshSlot,
    endpoints: HashMap<EndpointKey, Arc<EndpointState>>,
    breakers: HashMap<Arc<str>, Arc<crate::breaker::Breaker>>,
    /// FaultInjections, compiled.
    faults: HashMap<ServiceKey, Arc<crate::fault::Fault>>,
    backends: HashMap<(ServiceKey, u16), Arc<Backend>>,
    policies: HashMap<ServiceKey, &'a BackendPolicySpec>,
    services: HashMap<ServiceKey, &'a trellis_api::service::ServiceSpec>,
    defaults: Defaults,
    /// Where this proxy runs, for its backends' locality step.
    locality: crate::locality::Locality,
}

impl Builder<'_> {
    fn endpoint(&mut self, addr: SocketAddr, identity: Option<&str>) -> Arc<EndpointState> {
        // State (pools, latency) is per address and identity, within a snapshot and across
        // reloads: a connection made for one identity must not serve another.
        let k: EndpointKey = (addr, identity.map(Arc::from));
        if let Some(e) = self.endpoints.get(&k) {
            return e.clone();
        }
        let state = self
            .previous
            .and_then(|p| p.endpoints.get(&k))
            .cloned()
            .unwrap_or_else(|| Arc::new(EndpointState::new(addr, identity, self.mesh.clone())));
        self.endpoints.insert(k, state.clone());
        state
    }

    fn backend(&mut self, svc: &ServiceKey, port: u16) -> Arc<Backend> {
        if let Some(b) = self.backends.get(&(svc.clone(), port)) {
            return b.clone();
        }
        let spec = self.services[svc];
        let policy = self.policies.get(svc).copied();
        let lb = policy.map(|p| p.load_balancer.clone()).unwrap_or_default();
        let name: Arc<str> = format!("{}/{}:{port}", svc.namespace, svc.name).into();
        let members: Vec<Member> = spec
            .endpoints
            .iter()
            .filter_map(|e| {
                let addr: SocketAddr = e.address.parse().ok()?;
                Some(Member {
                    state: self.endpoint(addr, e.identity.as_deref()),
                    weight: e.weight,
                    locality: crate::locality::Locality::new(
                        e.region.as_deref(),
                        e.cluster.as_deref(),
                        e.zone.as_deref(),
                    ),
                })
            })
            .collect();
        let hash_on = lb.consistent_hash.as_ref().and_then(|h| {
            if let Some(name) = &h.header {
                HeaderName::try_from(name.as_str()).ok().map(HashOn::Header)
            } else if let Some(c) = &h.cookie {
                Some(HashOn::Cookie(c.clone()))
            } else {
                h.source_ip.then_some(HashOn::SourceIp)
            }
        });
        let bound = lb.consistent_hash.as_ref().map_or(1.25, |h| h.bounded_load);
        let t = policy.map(|p| p.timeouts.clone()).unwrap_or_default();
        let retry = policy.and_then(|p| p.retry.clone()).unwrap_or_default();
        // A reload (every endpoint change) must not refill the budget during an outage.
        let budget = self
            .previous
            .and_then(|p| p.port(svc, Some(port)))
            .map(|e| e.backend.budget.clone())
            .filter(|b| b.configured_as(&retry.budget))
            .unwrap_or_else(|| Arc::new(crate::retry::Budget::new(&retry.budget, Instant::now())));
        // The breaker's gate counts connections to these members, so it is made first.
        let gate = policy
            .and_then(|p| p.circuit_breaker.as_ref())
            .map(|cb| self.gate(&name, cb, &members));
        let mut balancer = Balancer::new(lb.algorithm, members, bound, lb.ewma_decay.get());
        let locality = policy.map(|p| p.locality.clone()).unwrap_or_default();
        if locality.enabled {
            balancer =
                balancer.with_locality(&self.locality, locality.overprovisioning_factor, |p| {
                    self.metrics.locality_counter(&name, p)
                });
        }
        // Validation rules out cycles, so this recursion ends.
        let fallback = policy.and_then(|p| p.fallback.as_ref()).map(|f| {
            let k = key(f.namespace.as_deref().unwrap_or(&svc.namespace), &f.name);
            let ports = &self.services[&k].ports;
            let port = f
                .port
                .or_else(|| ports.iter().any(|p| p.port == port).then_some(port))
                .unwrap_or(ports[0].port);
            let backend = self.backend(&k, port);
            Fallback {
                taken: self.metrics.fallback_counter(&name, &backend.name),
                backend,
            }
        });
        let backend = Arc::new(Backend {
            name,
            protocol: spec
                .ports
                .iter()
                .find(|p| p.port == port)
                .and_then(|p| p.app_protocol),
            balancer,
            hash_on,
            connect_timeout: t.connect.map_or(self.defaults.connect, |d| d.get()),
            request_timeout: t.request.map_or(self.defaults.request, |d| d.non_zero()),
            idle_timeout: t.idle.map_or(self.defaults.idle, |d| d.get()),
            retry: Arc::new(crate::retry::Policy::from_config(&retry)),
            budget,
            fallback,
            outlier: crate::outlier::Policy::on(
                &policy
                    .map(|p| p.outlier_detection.clone())
                    .unwrap_or_default(),
            ),
            ejecting: Default::default(),
            health_check: policy.and_then(|p| p.health_check.clone().map(Box::new)),
            gate,
        });
        self.backends.insert((svc.clone(), port), backend.clone());
        backend
    }

    /// A backend's circuit breaker: this config's limits over the counters it had in the
    /// previous snapshot, so what is in flight stays counted across a reload.
    fn gate(
        &mut self,
        name: &Arc<str>,
        cb: &trellis_api::policy::CircuitBreaker,
        members: &[Member],
    ) -> crate::breaker::Gate {
        let state = self
            .previous
            .and_then(|p| p.breakers.get(name))
            .cloned()
            .unwrap_or_default();
        self.breakers.insert(name.clone(), state.clone());
        crate::breaker::Gate {
            name: name.clone(),
            state,
            limits: crate::breaker::Limits::from_spec(cb),
            endpoints: members.iter().map(|m| m.state.clone()).collect(),
        }
    }

    /// The backend a reference names, or, when it does not resolve (validation lets that
    /// through, as the Gateway API does), why not: the reason its share of traffic gets.
    fn backend_ref(
        &mut self,
        route_ns: &str,
        b: &trellis_api::route::BackendRef,
    ) -> Result<Arc<Backend>, Arc<str>> {
        let exists = |ns: &str, name: &str| self.services.contains_key(&key(ns, name));
        if let Some((_, message)) = trellis_api::status::unresolved(route_ns, b, exists) {
            return Err(message.into());
        }
        let k = key(b.namespace.as_deref().unwrap_or(route_ns), &b.name);
        let port = b.port.unwrap_or_else(|| self.services[&k].ports[0].port);
        Ok(self.backend(&k, port))
    }

    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        ns: &str,
        route: &str,
        index: usize,
        name: Option<&str>,
        filters: &[HttpRouteFilter],
        refs: &[trellis_api::route::HttpBackendRef],
        timeouts: Option<&trellis_api::route::HttpRouteTimeouts>,
        retry: Option<&trellis_api::retry::HttpRouteRetry>,
        session: Option<&trellis_api::session::SessionPersistence>,
        loc: &Located<Resource>,
    ) -> Result<Rule, Diagnostics> {
        let id: Arc<str> = match name {
            Some(n) => format!("{ns}/{route}/{n}"),
            None => format!("{ns}/{route}/{index}"),
        }
        .into();
        let at = |e: String| Diagnostics(vec![loc.diagnostic(&format!("spec.rules[{index}]"), e)]);
        let filters = self.filters(ns, filters).map_err(at)?;
        // Sized once: a rule's backends live as long as the snapshot, and a growing vector
        // starts with room for four.
        let mut backends = Vec::with_capacity(refs.len());
        let mut unresolved = Vec::new();
        for r in refs {
            let backend = match self.backend_ref(ns, &r.backend()) {
                Ok(b) => b,
                Err(name) => {
                    unresolved.push(crate::route::Unresolved {
                        why: name,
                        weight: r.weight,
                    });
                    continue;
                }
            };
            let f = self.filters(ns, &r.filters).map_err(at)?;
            let stats = self.metrics.route_stats("outbound", &id, &backend.name);
            let retry = retry.map(|r| Arc::new(backend.retry.for_rule(r)));
            backends.push(WeightedBackend {
                backend,
                weight: r.weight,
                filters: f,
                stats,
                retry,
            });
        }
        let session = session.map(|s| {
            let targets: Vec<&Backend> = backends.iter().map(|b| &*b.backend).collect();
            Arc::new(crate::session::Persistence::new(
                self.session_key,
                self.metrics,
                &id,
                s,
                &targets,
            ))
        });
        Ok(Rule {
            id,
            filters,
            backends,
            // `Some(None)`: the rule turned the timeout off (`0s`).
            timeout: timeouts.and_then(|t| t.request).map(|d| d.non_zero()),
            try_timeout: timeouts
                .and_then(|t| t.backend_request)
                .and_then(|d| d.non_zero()),
            session,
            unresolved,
        })
    }

    fn filters(&mut self, ns: &str, list: &[HttpRouteFilter]) -> Result<Filters, String> {
        let mut out = FilterSet::default();
        for f in list {
            if let Some(m) = &f.request_header_modifier {
                out.request_headers = Some(Box::new(header_edit(m)?));
            }
            if let Some(m) = &f.response_header_modifier {
                out.response_headers = Some(Box::new(header_edit(m)?));
            }
            if let Some(r) = &f.request_redirect {
                out.redirect = Some(Box::new(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.as_ref().map(path_change),
                    port: r.port,
                    status: StatusCode::from_u16(r.status_code).map_err(|e| e.to_string())?,
                }));
            }
            if let Some(r) = &f.url_rewrite {
                out.rewrite = Some(Box::new(Rewrite {
                    hostname: r
                        .hostname
                        .as_deref()
                        .map(HeaderValue::try_from)
                        .transpose()
                        .map_err(|e| e.to_string())?,
                    path: r.path.as_ref().map(path_change),
                }));
            }
            if let Some(c) = &f.cors {
                out.cors = Some(Arc::new(crate::cors::Cors::compile(c)?));
            }
            if let Some(e) = &f.extension_ref {
                // Validation checked that it names a FaultInjection of this namespace.
                out.fault = self.faults.get(&key(ns, &e.name)).cloned();
            }
            if let Some(m) = &f.request_mirror {
                let backend = self.backend_ref(ns, &m.backend_ref);
                let per_million = match (&m.percent, &m.fraction) {
                    (Some(p), _) => p * 10_000,
                    (None, Some(fr)) => {
                        ((u64::from(fr.numerator) * 1_000_000) / u64::from(fr.denominator.max(1)))
                            as u32
                    }
                    (None, None) => 1_000_000,
                };
                match backend {
                    Ok(backend) => out.mirrors.push(Mirror {
                        backend,
                        per_million,
                    }),
                    // A mirror to nothing sends nothing; each request it would have copied
                    // is counted instead.
                    Err(_) => {
                        let b = &m.backend_ref;
                        let name = format!(
                            "{}/{}:{}",
                            b.namespace.as_deref().unwrap_or(ns),
                            b.name,
                            b.port.unwrap_or(0)
                        );
                        out.unresolved_mirrors.push((name.into(), per_million))
                    }
                }
            }
        }
        Ok(out.into())
    }
}

fn path_change(p: &PathModifier) -> PathChange {
    match p.kind {
        PathModifierType::ReplaceFullPath => {
            PathChange::Full(p.replace_full_path.clone().unwrap_or_else(|| "/".into()))
        }
        PathModifierType::ReplacePrefixMatch => {
            PathChange::Prefix(p.replace_prefix_match.clone().unwrap_or_else(|| "/".into()))
        }
    }
}

fn header_edit(m: &HeaderModifier) -> Result<HeaderEdit, String> {
    let pair = |h: &trellis_api::route::HeaderValue| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::try_from(h.name.as_str()).map_err(|e| e.to_string())?,
            HeaderValue::try_from(h.value.as_str()).map_err(|e| e.to_string())?,
        ))
    };
    Ok(HeaderEdit {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| HeaderName::try_from(n.as_str()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
    })
}

fn value_match(kind: ValueMatchType, value: &str) -> Result<ValueMatch, String> {
    Ok(match kind {
        ValueMatchType::Exact => ValueMatch::Exact(value.to_string()),
        ValueMatchType::RegularExpression => {
            ValueMatch::Regex(anchored(value).map_err(|e| e.to_string())?)
        }
    })
}

/// The first condition of each header name only (the spec ignores later ones).
fn header_matches(list: &[HeaderMatch]) -> Result<Vec<(HeaderName, ValueMatch)>, String> {
    trellis_api::attach::effective_headers(list)
        .into_iter()
        .map(|h| {
            Ok((
                HeaderName::try_from(h.name.as_str()).map_err(|e| e.to_string())?,
                value_match(h.kind, &h.value)?,
            ))
        })
        .collect()
}

pub(crate) fn compile_http_match(
    m: &trellis_api::route::HttpRouteMatch,
) -> Result<HttpMatch, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => match p.kind {
            PathMatchType::Exact => PathMatch::Exact(p.value.clone()),
            PathMatchType::PathPrefix => {
                let v = p.value.trim_end_matches('/');
                PathMatch::Prefix(if v.is_empty() {
                    "/".into()
                } else {
                    v.to_string()
                })
            }
            PathMatchType::RegularExpression => {
                PathMatch::Regex(anchored(&p.value).map_err(|e| e.to_string())?)
            }
        },
    };
    Ok(HttpMatch {
        path,
        method: m
            .method
            .as_deref()
            .map(|s| Method::from_bytes(s.as_bytes()))
            .transpose()
            .map_err(|e| e.to_string())?,
        headers: header_matches(&m.headers)?,
        query: trellis_api::attach::effective_query_params(&m.query_params)
            .into_iter()
            .map(|q| Ok((q.name.clone(), value_match(q.kind, &q.value)?)))
            .collect::<Result<_, String>>()?,
    })
}

pub(crate) fn compile_grpc_match(
    m: &trellis_api::route::GrpcRouteMatch,
) -> Result<GrpcMatch, String> {
    let (service, method) = match &m.method {
        None => (None, None),
        Some(mm) => (
            mm.service
                .as_deref()
                .map(|s| value_match(mm.kind, s))
                .transpose()?,
            mm.method
                .as_deref()
                .map(|s| value_match(mm.kind, s))
                .transpose()?,
        ),
    };
    Ok(GrpcMatch {
        service,
        method,
        headers: header_matches(&m.headers)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "spiffe://mesh.test/ns/default/sa/a";
    const B: &str = "spiffe://mesh.test/ns/default/sa/b";

    fn build(yaml: &str, previous: Option<&Snapshot>) -> Snapshot {
        let resources = trellis_api::parse_documents("test.yaml", yaml).unwrap();
        Snapshot::build(&resources, 1, "test.yaml", previous, &crate::Shared::new()).unwrap()
    }

    fn state(snap: &Snapshot, service: &str) -> Arc<EndpointState> {
        snap.port(&key("default", service), None)
            .unwrap()
            .backend
            .balancer
            .members()[0]
            .state
            .clone()
    }

    /// Services `first`, `second` and `plain` on one address: the first two expecting the
    /// given identities, the last none.
    fn shared_address(first: (&str, &str), second: (&str, &str)) -> String {
        let svc = |name: &str, identity: Option<&str>| {
            let id = identity.map_or(String::new(), |i| format!(", identity: '{i}'"));
            format!(
                "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{{address: '127.0.0.1:7001'{id}}}]\n"
            )
        };
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p}}\nspec: {{admin: {{address: 127.0.0.1:0}}}}\n{}{}{}",
            svc(first.0, Some(first.1)),
            svc(second.0, Some(second.1)),
            svc("plain", None)
        )
    }

    /// What a snapshot keeps is sized to what it holds (a mesh-wide view has thousands of
    /// service ports and route matches), and a service's host names share one key.
    #[test]
    fn a_snapshot_keeps_no_spare_room() {
        let yaml = "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p}\nspec: {admin: {address: 127.0.0.1:0}}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n  endpoints: [{address: '127.0.0.1:7001'}, {address: '127.0.0.1:7002'}, {address: '127.0.0.1:7003'}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules:\n    - matches: [{path: {type: PathPrefix, value: /x}}, {path: {type: Exact, value: /y}}, {method: GET}]\n      backendRefs: [{name: a, port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{name: a}]\n  rules:\n    - matches: [{method: {service: s.A}}, {method: {service: s.B}}, {method: {service: s.C}}]\n      backendRefs: [{name: a, port: 80}]\n";
        let snap = build(yaml, None);
        let ports = &snap.services[&key("default", "a")];
        assert_eq!((ports.len(), ports.capacity()), (1, 1));
        let http = &ports[0].http.as_ref().unwrap().entries;
        assert_eq!((http.len(), http.capacity()), (3, 3));
        let grpc = &ports[0].grpc.as_ref().unwrap().entries;
        assert_eq!((grpc.len(), grpc.capacity()), (3, 3));
        let names = [
            "a",
            "a.default",
            "a.default.svc",
            "a.default.svc.cluster.local",
        ];
        for h in names {
            assert_eq!(*snap.hosts[h], key("default", "a"), "{h}");
            assert!(Arc::ptr_eq(&snap.hosts[h], &snap.hosts["a"]), "{h}: a copy");
        }
    }

    /// A backend without a health check (most of them) does not carry an empty one.
    #[test]
    fn a_backend_is_small() {
        let size = size_of::<Backend>();
        assert!(size <= 480, "{size} bytes");
    }

    /// Backend references that do not resolve keep their weight, and their share is
    /// answered with 500; a mirror to nothing is kept aside to be counted.
    #[test]
    fn unresolved_backends_take_their_share_as_errors() {
        let yaml = "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p}\nspec: {admin: {address: 127.0.0.1:0}}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n  endpoints: [{address: '127.0.0.1:7001'}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules:\n    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 81}, percent: 50}}]\n      backendRefs:\n        - {name: a, port: 80}\n        - {name: nope, port: 80}\n        - {group: example.com, kind: Bucket, name: b, weight: 2}\n";
        let snap = build(yaml, None);
        let entry = snap.port(&key("default", "a"), Some(80)).unwrap();
        let parts = http::Request::get("/x").body(()).unwrap().into_parts().0;
        let outcome = |random: u64| match crate::decide::route(entry, 80, &parts, random) {
            crate::decide::Decision::Forward(f) => {
                let rule = f.rule.unwrap();
                assert_eq!(
                    rule.filters.unresolved_mirrors,
                    [(Arc::from("default/shadow:81"), 500_000)]
                );
                assert!(rule.filters.mirrors.is_empty());
                format!("{} {}", StatusCode::OK, f.backend.name)
            }
            crate::decide::Decision::Fail(e) => format!("{} {e}", e.status()),
            other => panic!("{other:?}"),
        };
        let want = [
            "200 OK default/a:80",
            "500 Internal Server Error route default/r/0: Service default/nope does not exist",
            "500 Internal Server Error route default/r/0: example.com/Bucket b is not supported: backends are core Services",
            "500 Internal Server Error route default/r/0: example.com/Bucket b is not supported: backends are core Services",
        ];
        for random in 0..8u64 {
            assert_eq!(
                outcome(random),
                want[(random % 4) as usize],
                "random {random}"
            );
        }
    }

    #[test]
    fn a_reload_keeps_the_retry_budget_unless_its_config_changes() {
        let yaml = |budget: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p}}\nspec: {{admin: {{address: 127.0.0.1:0}}}}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{{address: '127.0.0.1:7001'}}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: s}}\n  retry: {{budget: {budget}}}\n"
            )
        };
        let budget = |snap: &Snapshot| {
            snap.port(&key("default", "s"), None)
                .unwrap()
                .backend
                .budget
                .clone()
        };
        let first = build(&yaml("{ratio: 0.2}"), None);
        let same = build(&yaml("{ratio: 0.2}"), Some(&first));
        assert!(Arc::ptr_eq(&budget(&first), &budget(&same)));
        let changed = build(&yaml("{ratio: 0.5}"), Some(&same));
        assert!(!Arc::ptr_eq(&budget(&same), &budget(&changed)));
    }

    #[test]
    fn endpoint_state_is_per_address_and_identity() {
        // In both orders of the services (the first built used to win the address).
        for (first, second) in [(("alpha", A), ("beta", B)), (("alpha", B), ("beta", A))] {
            let snap = build(&shared_address(first, second), None);
            assert_eq!(snap.endpoints.len(), 3, "{:?}", snap.endpoints.keys());
            for (name, identity) in [first, second] {
                let s = state(&snap, name);
                assert_eq!(s.identity, crate::tls::server_name(identity), "{name}");
                let k: EndpointKey = (s.addr, Some(identity.into()));
                assert!(Arc::ptr_eq(&snap.endpoints[&k], &s));
            }
            assert_eq!(state(&snap, "plain").identity, None);
            assert!(!Arc::ptr_eq(&state(&snap, "alpha"), &state(&snap, "beta")));

            // Across a reload each keeps its own state; an identity that changes gets fresh
            // state.
            let again = build(&shared_address(first, second), Some(&snap));
            for name in ["alpha", "beta", "plain"] {
                assert!(
                    Arc::ptr_eq(&state(&snap, name), &state(&again, name)),
                    "{name}"
                );
            }
            let swapped = build(
                &shared_address((first.0, second.1), (second.0, first.1)),
                Some(&snap),
            );
            assert!(Arc::ptr_eq(
                &state(&snap, "alpha"),
                &state(&swapped, "beta")
            ));
            assert!(Arc::ptr_eq(
                &state(&snap, "beta"),
                &state(&swapped, "alpha")
            ));
        }
    }

    #[test]
    fn inbound_listeners_take_their_service_ports_protocol_and_layer7_need() {
        let yaml = |listener: &str, ports: &str, extra: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: p}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '127.0.0.1:8080', service: app{listener}}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: {ports}
{extra}"
            )
        };
        let inbound = |snap: &Snapshot| {
            let l = &snap.listeners[0];
            match &l.kind {
                ListenerKind::Inbound { requires_http, .. } => (l.protocol, *requires_http),
                _ => unreachable!(),
            }
        };
        let deny_admin = "---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: Deny
  rules: [{to: {paths: [/admin/*]}}]
";
        let by_identity = "---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: shop-only}
spec:
  action: Allow
  rules: [{from: {namespaces: [shop]}}]
";
        use AppProtocol::{Grpc, Http, Tcp};
        // (listener fields, service ports, other resources, (protocol, requires HTTP))
        type Case<'a> = (&'a str, &'a str, &'a str, (Option<AppProtocol>, bool));
        let cases: &[Case] = &[
            // the only port, the port equal to the app's, or the one named
            (
                "",
                "[{port: 80, appProtocol: http}]",
                "",
                (Some(Http), false),
            ),
            (
                "",
                "[{port: 80, appProtocol: http}, {port: 8080, appProtocol: grpc}]",
                "",
                (Some(Grpc), false),
            ),
            (
                ", servicePort: 80",
                "[{port: 80, appProtocol: http}, {port: 8080, appProtocol: grpc}]",
                "",
                (Some(Http), false),
            ),
            // several ports, none chosen: detection
            (
                "",
                "[{port: 80, appProtocol: http}, {port: 81, appProtocol: tcp}]",
                "",
                (None, false),
            ),
            // the listener's own declaration wins
            (
                ", protocol: tcp",
                "[{port: 80, appProtocol: http}]",
                "",
                (Some(Tcp), false),
            ),
            // what the policy reads
            ("", "[{port: 80}]", deny_admin, (None, true)),
            ("", "[{port: 80}]", by_identity, (None, false)),
        ];
        for (listener, ports, extra, want) in cases {
            let snap = build(&yaml(listener, ports, extra), None);
            assert_eq!(inbound(&snap), *want, "{listener} {ports} {extra}");
        }
    }
}
