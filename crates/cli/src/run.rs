//! `trellis run`: start an app with its sidecar, register the instance, health-check the app
//! and report its health, deregister when the app exits. Also the control-plane mode of
//! `trellis proxy`, which `run` builds on.

use anyhow::{Context, Result, anyhow};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use trellis_api::meta::{DEFAULT_NAMESPACE, Metadata};
use trellis_api::proxy::{
    AdminListener, InboundListener, OutboundListener, ProxySpec, ServiceTarget,
};
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_api::{Kind, Located, Object, Resource, TRELLIS_API_VERSION};
use trellis_proxy::Proxy;
use trellis_proxy::control::{ControlTls, Follow, HeldSet, SOURCE, assemble, follow};

/// Starts a proxy that follows the control plane: from its persisted set when there is one
/// (so it serves even if the control plane is down), else from local config alone.
pub async fn start_sidecar(
    control: &str,
    local: Vec<Located<Resource>>,
    node: wire::Node,
    state_dir: &Path,
    tls: ControlTls,
) -> Result<(Arc<Proxy>, Option<String>)> {
    // The state directory holds the workload key: owner-only, checked before use.
    trellis_identity::files::private_dir(state_dir).context("the proxy's state directory")?;
    let state_file = state_dir.join("snapshot.json");
    for f in [&state_file, &state_dir.join("identity.json")] {
        trellis_identity::files::check_private(f).context("the proxy's state directory")?;
    }
    let held = match HeldSet::load(&state_file) {
        Ok(h) => h.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable persisted config");
            HeldSet::default()
        }
    };
    let persisted = held.parse().unwrap_or_default();
    let started = Proxy::start(&assemble(&local, persisted), SOURCE).await;
    crate::release_memory();
    let (proxy, held) = match started {
        Ok(p) => {
            if !held.is_empty() {
                tracing::info!(version = %held.version, resources = held.len(), file = %state_file.display(), "booted from the persisted config");
            }
            (p, held)
        }
        Err(e) if !held.is_empty() => {
            tracing::warn!(error = %e, "persisted config does not fit the local config; starting from local config only");
            let p = Proxy::start(&assemble(&local, vec![]), SOURCE)
                .await
                .map_err(|e| anyhow!("cannot start:\n{e}"))?;
            (p, HeldSet::default())
        }
        Err(e) => return Err(anyhow!("cannot start:\n{e}")),
    };
    // The identity first: the control plane authenticates proxies with it (or the token).
    let identity = start_identity(&proxy, control, tls.clone(), state_dir).await?;
    // Traffic reports and taps for the fleet view (trellis stat, top, edges, tap).
    tokio::spawn(trellis_proxy::report::run(
        proxy.clone(),
        trellis_proxy::report::ReportConfig {
            endpoints: endpoints(control),
            node: node.clone(),
            tls: tls.clone(),
        },
    ));
    // Shares of Global rate limits.
    tokio::spawn(trellis_proxy::quota::run(
        proxy.clone(),
        trellis_proxy::quota::QuotaConfig {
            endpoints: endpoints(control),
            node: node.clone(),
            tls: tls.clone(),
        },
    ));
    tokio::spawn(follow(
        proxy.clone(),
        Follow {
            endpoints: endpoints(control),
            node,
            local,
            state_file: Some(state_file),
            tls,
            release: Some(crate::release_memory),
            max_response_bytes: trellis_proxy::control::MAX_RESPONSE_BYTES,
        },
        held,
    ));
    Ok((proxy, identity))
}

/// Gives the proxy its identity: from the persisted certificate, or a join token; then keeps
/// it renewed. Without either the sidecar runs without mutual TLS (peers in strict mode will
/// refuse it). Returns the SPIFFE id.
pub async fn start_identity(
    proxy: &Arc<Proxy>,
    control: &str,
    tls: ControlTls,
    state_dir: &Path,
) -> Result<Option<String>> {
    let no_token = tls.token.is_none();
    let cfg = trellis_proxy::identity::IdentityConfig {
        endpoints: endpoints(control),
        tls,
        state_dir: state_dir.to_path_buf(),
    };
    if no_token && !state_dir.join("identity.json").exists() {
        tracing::warn!("no --token: this sidecar has no identity and uses no mutual TLS");
        return Ok(None);
    }
    let (key, issued) = trellis_proxy::identity::bootstrap(proxy, &cfg)
        .await
        .context("getting a workload certificate")?;
    tokio::spawn(trellis_proxy::identity::renew(
        proxy.clone(),
        cfg,
        key,
        issued,
    ));
    Ok(proxy.credentials().map(|c| c.identity().to_string()))
}

/// The replicas in a `--control` value: comma-separated URLs.
pub fn endpoints(control: &str) -> Vec<String> {
    control
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The node a local config describes: its upstreams, and whether it proxies by Host.
pub fn node_for(id: String, service: &str, local: &[Located<Resource>]) -> wire::Node {
    let mut node = wire::Node {
        id,
        namespace: DEFAULT_NAMESPACE.into(),
        service: service.into(),
        proxy_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    for r in local {
        if let Resource::Proxy(p) = &r.value {
            node.namespace = p.metadata.namespace.clone();
            if node.service.is_empty()
                && let Some(svc) = p.spec.inbound.iter().find_map(|l| l.service.clone())
            {
                node.service = svc;
            }
            for l in &p.spec.outbound {
                match &l.service {
                    Some(t) => node.upstreams.push(match &t.namespace {
                        Some(ns) => format!("{ns}/{}", t.name),
                        None => t.name.clone(),
                    }),
                    None => node.all_services = true,
                }
            }
        }
    }
    node
}

/// How `trellis run` checks the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect to the app's port.
    Tcp,
    /// `GET PATH` answered with 2xx or 3xx.
    Http(String),
    /// No check: always healthy.
    None,
}

impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Probe, String> {
        match s {
            "tcp" => Ok(Probe::Tcp),
            "none" => Ok(Probe::None),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Probe::Http(path.into())),
                _ => Err(format!(
                    "{s:?}: use tcp, none or http:/PATH (for example http:/healthz)"
                )),
            },
        }
    }
}

/// One health check of the app at `addr`, bounded by `timeout`.
pub async fn check(probe: &Probe, addr: SocketAddr, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        match probe {
            Probe::None => true,
            Probe::Tcp => tokio::net::TcpStream::connect(addr).await.is_ok(),
            Probe::Http(path) => {
                let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                    return false;
                };
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: trellis-health\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(req.as_bytes()).await.is_err() {
                    return false;
                }
                let mut buf = [0u8; 32];
                let mut n = 0;
                while n < 12 {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(m) => n += m,
                    }
                }
                // `HTTP/1.1 200`: the status code's first digit.
                n >= 12 && buf.starts_with(b"HTTP/1.") && matches!(buf[9], b'2' | b'3')
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(false)
}

/// Options of `trellis run`.
pub struct RunOptions {
    pub service: Option<String>,
    pub namespace: String,
    pub port: Option<u16>,
    pub service_port: u16,
    pub upstreams: Vec<(String, u16)>,
    pub labels: BTreeMap<String, String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub cluster: Option<String>,
    pub probe: Probe,
    pub probe_interval: Duration,
    pub ttl: Duration,
    pub advertise: std::net::IpAddr,
    pub control: String,
    pub state_dir: Option<PathBuf>,
    pub tls: ControlTls,
    pub command: Vec<String>,
}

/// Free ports for the sidecar's listeners. Each stays bound until every port is picked, so
/// the kernel never hands out one port twice (admin and inbound once collided that way).
#[derive(Default)]
struct FreePorts(Vec<std::net::TcpListener>);

impl FreePorts {
    fn pick(&mut self, ip: std::net::IpAddr) -> Result<u16> {
        let l = std::net::TcpListener::bind((ip, 0))?;
        let port = l.local_addr()?.port();
        self.0.push(l);
        Ok(port)
    }
}

/// Runs the app and its sidecar until the app exits or a signal arrives; returns the app's
/// exit code.
pub async fn run(o: RunOptions) -> Result<i32> {
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    let name = o.service.clone().unwrap_or_else(|| {
        Path::new(&o.command[0])
            .file_name()
            .map_or("app".into(), |n| node_name(&n.to_string_lossy()))
    });
    let mut ports = FreePorts::default();
    let admin = SocketAddr::new(loopback, ports.pick(loopback)?);
    let http_proxy = SocketAddr::new(loopback, ports.pick(loopback)?);
    let mut spec = ProxySpec {
        admin: AdminListener {
            address: admin.to_string(),
        },
        // The sidecar's own locality: its backends prefer endpoints near it.
        locality: trellis_api::locality::Locality {
            region: o.region.clone(),
            cluster: o.cluster.clone(),
            zone: o.zone.clone(),
        },
        ..ProxySpec::default()
    };
    let inbound = match (o.port, &o.service) {
        (Some(port), Some(_)) => {
            let addr = SocketAddr::new(o.advertise, ports.pick(o.advertise)?);
            spec.inbound.push(InboundListener {
                name: "inbound".into(),
                address: addr.to_string(),
                forward_to: SocketAddr::new(loopback, port).to_string(),
                service: o.service.clone(),
                // The protocol is the Service port's `appProtocol`, from the control plane.
                service_port: Some(o.service_port),
                protocol: None,
            });
            Some(addr)
        }
        _ => None,
    };
    // Released for the sidecar to bind.
    drop(ports);
    for (svc, port) in &o.upstreams {
        // `NAMESPACE/NAME` reaches a Service in another namespace (where consumer routes
        // of this app's namespace apply).
        let (namespace, name) = match svc.split_once('/') {
            Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
            None => (None, svc.clone()),
        };
        spec.outbound.push(OutboundListener {
            name: format!("upstream-{svc}"),
            address: SocketAddr::new(loopback, *port).to_string(),
            service: Some(ServiceTarget {
                name,
                namespace,
                port: None,
            }),
            http_proxy: false,
            protocol: None,
        });
    }
    spec.outbound.push(OutboundListener {
        name: "http-proxy".into(),
        address: http_proxy.to_string(),
        service: None,
        http_proxy: true,
        protocol: None,
    });
    let local = vec![Located::unsourced(
        Resource::Proxy(Object {
            api_version: TRELLIS_API_VERSION.into(),
            kind: Kind::Proxy.as_str().into(),
            metadata: Metadata {
                name: name.clone(),
                namespace: o.namespace.clone(),
                ..Metadata::default()
            },
            spec,
            status: None,
        }),
        "trellis run",
    )];
    let node_id = format!("{name}-{}", std::process::id());
    let node = node_for(node_id.clone(), o.service.as_deref().unwrap_or(""), &local);
    let state_dir = o.state_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join("trellis").join(format!(
            "{}.{}.{}",
            o.namespace,
            name,
            o.port.unwrap_or(0)
        ))
    });
    let (proxy, identity) =
        start_sidecar(&o.control, local, node, &state_dir, o.tls.clone()).await?;
    tracing::info!(admin = %proxy.admin_addr(), http_proxy = %http_proxy, "sidecar started");

    // The app starts through `trellis exec-app`, which arms a parent-death signal and then
    // becomes the app: if `trellis run` is killed outright, the kernel kills the app, so no
    // orphan keeps the port. The signal fires when the *thread* that forked exits: this
    // runs in `block_on` on the main thread, which lives as long as the process (never
    // spawn from a runtime worker or the blocking pool, whose threads come and go).
    let exe = std::env::current_exe().context("finding the trellis binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("exec-app")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .args(&o.command)
        // Its own process group: a graceful stop signals the app and what it started.
        .process_group(0)
        .env("HTTP_PROXY", format!("http://{http_proxy}"))
        .env("http_proxy", format!("http://{http_proxy}"))
        .env("NO_PROXY", "")
        // The sidecar's credential is not the app's.
        .env_remove("TRELLIS_TOKEN")
        .env_remove("TRELLIS_TOKEN_FILE")
        .env("TRELLIS_ADMIN", admin.to_string());
    if let Some(port) = o.port {
        cmd.env("PORT", port.to_string());
    }
    for (svc, port) in &o.upstreams {
        let var = format!(
            "TRELLIS_UPSTREAM_{}",
            svc.to_ascii_uppercase().replace(['-', '.'], "_")
        );
        cmd.env(var, format!("http://127.0.0.1:{port}"));
    }
    let mut child = cmd
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", o.command[0]))?;
    let pid = child.id();
    if let Some(pid) = pid {
        // Its CPU and memory go into the sidecar's reports (the capacity report).
        proxy.set_app_process(pid);
    }

    let stop = tokio_util::sync::CancellationToken::new();
    let registry = match (inbound, &o.service, o.port) {
        (Some(address), Some(service), Some(port)) => Some(tokio::spawn(register_loop(
            Registration {
                proxy: proxy.clone(),
                tls: o.tls.clone(),
                control: o.control.clone(),
                instance: wire::Instance {
                    namespace: o.namespace.clone(),
                    service: service.clone(),
                    address: address.to_string(),
                    port: u32::from(o.service_port),
                    labels: o.labels.clone().into_iter().collect(),
                    zone: o.zone.clone().unwrap_or_default(),
                    region: o.region.clone().unwrap_or_default(),
                    cluster: o.cluster.clone().unwrap_or_default(),
                    healthy: false,
                    node: node_id,
                    identity: identity.unwrap_or_default(),
                    // The app's address is what a restart keeps; the newest process wins it.
                    slot: SocketAddr::new(o.advertise, port).to_string(),
                    epoch: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                },
                ttl: o.ttl,
                probe: o.probe.clone(),
                interval: o.probe_interval,
                app: SocketAddr::new(loopback, port),
            },
            stop.clone(),
        ))),
        _ => None,
    };

    let exited = tokio::select! {
        status = child.wait() => {
            let status = status?;
            tracing::info!(%status, "app exited");
            Some(status.code().unwrap_or(1))
        }
        () = crate::shutdown_signal() => None,
    };
    // The order that loses nothing: leave the registry (no new traffic is sent here), drain
    // (requests in flight finish, in and out, while the app still runs), then stop the app.
    stop.cancel();
    if let Some(r) = registry {
        let _ = r.await;
    }
    let deadline = proxy.snapshot().settings.drain_timeout;
    tracing::info!(?deadline, "draining");
    if !proxy.drain(deadline).await {
        tracing::warn!("drain deadline passed with work in flight");
    }
    let code = match (exited, pid) {
        (Some(code), _) => code,
        (None, Some(pid)) => stop_app(&mut child, pid, APP_GRACE).await,
        (None, None) => 0,
    };
    Ok(code)
}

/// How long the app has to exit after SIGTERM before it is killed.
const APP_GRACE: Duration = Duration::from_secs(10);

/// Stops the app's process group: SIGTERM, then SIGKILL after `grace`. Returns its exit code.
async fn stop_app(child: &mut tokio::process::Child, pid: u32, grace: Duration) -> i32 {
    use rustix::process::{Pid, Signal, kill_process_group};
    tracing::info!(pid, "stopping the app");
    let group = i32::try_from(pid).ok().and_then(Pid::from_raw);
    if let Some(g) = group {
        let _ = kill_process_group(g, Signal::TERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s.ok().and_then(|s| s.code()).unwrap_or(0),
        Err(_) => {
            tracing::warn!(pid, ?grace, "the app did not exit; killing it");
            if let Some(g) = group {
                let _ = kill_process_group(g, Signal::KILL);
            }
            let _ = child.kill().await;
            137
        }
    }
}

/// `trellis exec-app`: arms the parent-death signal, checks that `trellis run` (`parent`) is
/// still there (it may have died before the signal was armed, and then nothing would fire),
/// and becomes the app. Returns only on failure.
pub fn exec_app(parent: u32, command: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("setting the parent-death signal")?;
    let ppid = rustix::process::getppid().map(|p| p.as_raw_pid());
    if ppid != i32::try_from(parent).ok() {
        anyhow::bail!("trellis run (pid {parent}) exited before its app started");
    }
    // The parent-death signal survives execve.
    let e = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    Err(anyhow!(e).context(format!("starting {}", command[0])))
}

struct Registration {
    proxy: Arc<Proxy>,
    tls: ControlTls,
    control: String,
    instance: wire::Instance,
    ttl: Duration,
    probe: Probe,
    interval: Duration,
    app: SocketAddr,
}

/// Registers, heartbeats with the app's health every `interval` (and at least three times
/// per lease), re-registers after a lapse or a control-plane outage, and deregisters on stop.
async fn register_loop(r: Registration, stop: tokio_util::sync::CancellationToken) {
    let beat = r.interval.min(r.ttl / 3);
    // Never slower than the heartbeat: with a short lease, a 5 s backoff would outlast it.
    let first = Duration::from_millis(200);
    let mut backoff =
        trellis_proxy::control::Backoff::new(first, Duration::from_secs(5).min(beat).max(first));
    let mut id: Option<String> = None;
    let mut client: Option<MeshClient<tonic::transport::Channel>> = None;
    let replicas = endpoints(&r.control);
    let mut next = 0usize;
    loop {
        let healthy = check(&r.probe, r.app, Duration::from_secs(1)).await;
        let c = match &mut client {
            Some(c) => c,
            None => match r.tls.connect_lazy(
                &replicas[next % replicas.len()],
                r.proxy.credentials().as_ref(),
                |e| {
                    e.connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(5))
                },
            ) {
                Ok(ch) => client.insert(MeshClient::new(ch)),
                Err(e) => {
                    tracing::error!(error = %e, "bad control plane URL");
                    return;
                }
            },
        };
        let signed = |body| {
            let mut req = tonic::Request::new(body);
            trellis_proxy::identity::authorize(&mut req, &r.proxy, &r.tls);
            req
        };
        let result = match &id {
            None => c
                .register(signed(wire::RegisterRequest {
                    instance: Some(wire::Instance {
                        healthy,
                        ..r.instance.clone()
                    }),
                    ttl_seconds: u32::try_from(r.ttl.as_secs()).unwrap_or(30),
                }))
                .await
                .map(|resp| {
                    let i = resp.into_inner().id;
                    tracing::info!(id = %i, healthy, "registered with the control plane");
                    id = Some(i);
                }),
            Some(i) => c
                .heartbeat({
                    let mut req = tonic::Request::new(wire::HeartbeatRequest {
                        id: i.clone(),
                        healthy,
                    });
                    trellis_proxy::identity::authorize(&mut req, &r.proxy, &r.tls);
                    req
                })
                .await
                .map(|_| ()),
        };
        let wait = match result {
            Ok(()) => {
                backoff.reset();
                beat
            }
            Err(s) => {
                if s.code() == tonic::Code::NotFound {
                    tracing::warn!("registration lapsed; registering again");
                    id = None;
                } else if s.code() == tonic::Code::FailedPrecondition {
                    // A newer process of this instance took over its registration.
                    tracing::error!(error = %s.message(), "superseded; no longer registering");
                    id = None;
                    break;
                } else {
                    tracing::warn!(error = %s.message(), "registry call failed; trying the next replica");
                    client = None;
                    next += 1;
                }
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if let (Some(i), Some(c)) = (id, client.as_mut()) {
        let mut req = tonic::Request::new(wire::DeregisterRequest { id: i.clone() });
        trellis_proxy::identity::authorize(&mut req, &r.proxy, &r.tls);
        match c.deregister(req).await {
            Ok(_) => tracing::info!(id = %i, "deregistered"),
            Err(e) => {
                tracing::warn!(id = %i, error = %e.message(), "deregistration failed; the lease will lapse")
            }
        }
    }
}

/// A name from a command's file name that serves as the local Proxy's name and its node id:
/// lowercase letters, digits, `-` and `.`, a letter or digit at each end, at most 253 bytes
/// (what `check_name` and a control plane's hello take).
fn node_name(file: &str) -> String {
    let mapped: String = file
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.') => c,
            _ => '-',
        })
        .take(253)
        .collect();
    let name = mapped.trim_matches(|c| c == '-' || c == '.');
    if name.is_empty() {
        "app".into()
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_s_file_name_makes_a_name_a_proxy_and_a_control_plane_take() {
        for (file, want) in [
            ("my app\tv2", "my-app-v2"),
            ("My_App ", "my-app"),
            ("server.py", "server.py"),
            ("--.x.--", "x"),
            ("é", "app"),
            ("", "app"),
        ] {
            assert_eq!(node_name(file), want, "{file:?}");
            if want != "app" {
                trellis_api::meta::check_name(want).unwrap();
            }
        }
        assert_eq!(node_name(&"x".repeat(300)).len(), 253);
    }

    #[test]
    fn probe_parsing() {
        assert_eq!("tcp".parse::<Probe>(), Ok(Probe::Tcp));
        assert_eq!("none".parse::<Probe>(), Ok(Probe::None));
        assert_eq!(
            "http:/healthz".parse::<Probe>(),
            Ok(Probe::Http("/healthz".into()))
        );
        assert!(
            "http:healthz"
                .parse::<Probe>()
                .unwrap_err()
                .contains("http:/PATH")
        );
        assert!("grpc".parse::<Probe>().is_err());
    }
}
