//! `trellis`: one binary for the mesh. This file parses arguments and wires components; the
//! work happens in the library crates.
// `deny`, not `forbid`: one declaration below (`mimalloc_ffi`) needs `unsafe`.
#![deny(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use trellis_control::store::StoreSpec;

// Per-exchange buffers are cheap in mimalloc and slow in glibc's bins (docs/ARCHITECTURE.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands the pages the allocator freed on this thread back to the OS. mimalloc purges freed
/// pages only on later allocation activity, so an idle sidecar kept the peak of its last
/// config apply (18 MB with a 1,000-service view and `--threads 1`: bench/RESULTS.md).
/// Called after each apply, on the thread that applied it.
#[cfg(feature = "mimalloc")]
pub(crate) fn release_memory() {
    mimalloc_ffi::mi_collect(true);
}

/// The system allocator: nothing to do (glibc returns large blocks itself).
#[cfg(not(feature = "mimalloc"))]
pub(crate) fn release_memory() {}

#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
mod mimalloc_ffi {
    // SAFETY: this is the C declaration of mimalloc's `void mi_collect(bool force)`
    // (mimalloc.h), linked in by the `mimalloc` crate's static library. It takes no pointers,
    // touches only mimalloc's own state, and may be called from any thread at any time, so
    // calling it is safe. (libmimalloc-sys declares it only behind its `extended` feature,
    // which would add a crate.)
    unsafe extern "C" {
        pub safe fn mi_collect(force: bool);
    }
}

mod capacity_cmd;
mod check_cmd;
mod client;
mod config_cmd;
mod demo;
mod explain_cmd;
mod fleet_cmd;
mod run;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh")]
struct Cli {
    /// Log filter, for example `info` or `trellis_proxy=debug`.
    #[arg(long, global = true, env = "TRELLIS_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar proxy: standalone from a file, or following the control plane.
    Proxy {
        /// Config file (YAML). Standalone: the whole config, watched and hot-reloaded. With
        /// --control: the proxy's local `Proxy` resource (listeners); the control plane
        /// supplies services, routes and policies.
        #[arg(long, short)]
        config: PathBuf,
        /// Follow this control plane.
        #[arg(long)]
        control: Option<String>,
        /// With --control: where the last accepted config is persisted.
        #[arg(long, default_value = "trellis-proxy-state")]
        state_dir: PathBuf,
        /// With --control: this proxy's id (default: the Proxy's name and the process id).
        #[arg(long)]
        node_id: Option<String>,
        /// With --control: a join token for this proxy's certificate (mutual TLS). Prefer
        /// TRELLIS_TOKEN or --token-file: arguments show in /proc/PID/cmdline.
        #[arg(
            long,
            env = "TRELLIS_TOKEN",
            hide_env_values = true,
            requires = "control"
        )]
        token: Option<String>,
        /// With --control: read the join token from this file (owner-only).
        #[arg(
            long,
            env = "TRELLIS_TOKEN_FILE",
            conflicts_with = "token",
            requires = "control"
        )]
        token_file: Option<PathBuf>,
        /// With --control: the control plane's trust bundle (its ca.pem), for a proxy whose
        /// token carries no CA fingerprint.
        #[arg(long, env = "TRELLIS_CA_FILE", requires = "control")]
        ca_file: Option<PathBuf>,
        /// With --control: allow an http:// control plane URL (plaintext; tests and
        /// benchmarks only).
        #[arg(long, env = "TRELLIS_INSECURE")]
        insecure: bool,
        /// Worker threads for the data path.
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// Most socket readiness events the data path takes from the kernel at once (per
        /// wait): a smaller batch is handed on to the next hop sooner, a larger one costs
        /// fewer system calls.
        #[arg(long, env = "TRELLIS_IO_BATCH", default_value_t = PROXY_IO_BATCH,
              value_parser = clap::value_parser!(u32).range(1..=4096))]
        io_batch: u32,
        /// How often the config file is checked for changes (standalone).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        watch_interval: Duration,
    },
    /// Run the control plane.
    Control {
        /// Address for the config API and the proxy protocol.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// A data directory (embedded store) or etcd://HOST:PORT[,HOST:PORT…][/PREFIX].
        #[arg(long, default_value = "trellis-data")]
        store: String,
        /// Lease granted to instances that ask for none.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        default_ttl: Duration,
        /// Trust domain of the CA generated at first start (SPIFFE ids are
        /// spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE).
        #[arg(long, default_value = "trellis.local")]
        trust_domain: String,
        /// Lifetime of workload certificates.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// Sign with this root or intermediate certificate (PEM) instead of a generated root.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The private key of --ca-cert (PKCS#8 PEM).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// With an intermediate --ca-cert: the certificates between it and the root (PEM).
        #[arg(long)]
        ca_chain: Option<PathBuf>,
        /// The roots to trust (PEM, several during a rotation); default: --ca-cert itself.
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
        /// Where the admin token is written when it is created (first start); default
        /// STORE-DIR/admin-token, or ./trellis-admin-token with etcd. The trust bundle
        /// (public) is written beside it as ca.pem.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Keep a generated CA's private key in this file (0600) instead of the store
        /// (with etcd the store is replicated; see docs/security.md).
        #[arg(long, conflicts_with = "ca_cert")]
        ca_key_file: Option<PathBuf>,
        /// Extra names (DNS or IP) in the control plane's TLS certificate, besides
        /// localhost, the loopback addresses and the --listen address.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// Serve plaintext instead of TLS (tests and benchmarks only): tokens and the admin
        /// token then cross the network in clear.
        #[arg(long)]
        insecure: bool,
        /// Most connections served at once.
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
        /// A connection must finish its TLS handshake within this.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        handshake_timeout: Duration,
        /// A connection that sends nothing for this long is closed (proxies ping every 10s).
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        idle_timeout: Duration,
        /// The p99 objective of the capacity metric (trellis_capacity_recommended_instances).
        #[arg(long, default_value = "200ms", value_parser = parse_duration)]
        capacity_latency_objective: Duration,
        /// The CPU utilization the capacity metric aims for (0-1].
        #[arg(long, default_value_t = 0.6, value_parser = parse_utilization)]
        capacity_target_utilization: f64,
        /// With etcd: compact its history this often, to the revision of the time before
        /// (as kube-apiserver does); 0s leaves it to etcd's --auto-compaction-retention.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        etcd_compaction_interval: Duration,
        /// MiB that the gRPC requests of one service's proxies may hold while they are read
        /// and decoded (past it they wait, unread); requests without credentials share a
        /// sixteenth of it.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=65536))]
        read_budget_mib: u64,
    },
    /// Join tokens: what a sidecar presents to get its first certificate.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Create or update resources from files, atomically.
    Apply {
        /// Files or directories.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Validate against the control plane's state without writing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show resources, or `proxies` and `workloads`.
    Get {
        /// A kind (HTTPRoute, services, …), `proxies` or `workloads`.
        kind: String,
        /// One resource's name.
        name: Option<String>,
        /// Namespace (default: all for lists, `default` for one resource).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: config_cmd::Output,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Delete resources by kind and name, or those in files, atomically.
    Delete {
        /// Kind.
        kind: Option<String>,
        /// Names.
        names: Vec<String>,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Delete what these files define.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Per service and per route: success rate, requests per second and latency
    /// percentiles over a recent window, as the control plane aggregates them from its
    /// proxies.
    Stat {
        /// Only this service.
        service: Option<String>,
        #[command(flatten)]
        select: FleetSelect,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: fleet_cmd::Format,
        #[command(flatten)]
        control: ControlArg,
    },
    /// `stat`, live: redrawn every --interval in a terminal (one frame with --once or when
    /// stdout is not a terminal).
    Top {
        /// Only this service.
        service: Option<String>,
        #[command(flatten)]
        select: FleetSelect,
        /// Time between frames.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Who calls whom: caller and callee services and identities, request counts, success
    /// rate and whether the hop is mutual TLS.
    Edges {
        /// Only edges from or to this service.
        service: Option<String>,
        #[command(flatten)]
        select: FleetSelect,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: fleet_cmd::Format,
        #[command(flatten)]
        control: ControlArg,
    },
    /// A live stream of request metadata from the sidecars, filtered; sensitive headers are
    /// redacted, and it stops by itself after --max events or --duration.
    Tap {
        /// Only the sidecars of this service.
        service: Option<String>,
        /// Only this namespace's sidecars.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only requests of this route (its id, `namespace/route/rule`).
        #[arg(long)]
        route: Option<String>,
        /// Only paths starting with this.
        #[arg(long)]
        path: Option<String>,
        /// Only this method.
        #[arg(long)]
        method: Option<String>,
        /// Only this status (503) or class (5xx).
        #[arg(long)]
        status: Option<String>,
        /// Only inbound or outbound requests.
        #[arg(long)]
        direction: Option<String>,
        /// Include request headers (authorization, cookie, set-cookie, proxy-authorization,
        /// x-api-key and --redact ones are redacted).
        #[arg(long)]
        show_headers: bool,
        /// Another header to redact (repeatable).
        #[arg(long = "redact")]
        redact: Vec<String>,
        /// Stop after this many events.
        #[arg(long, default_value_t = 100)]
        max: u64,
        /// Stop after this long.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// Output format: a line per request, or a JSON object per line.
        #[arg(short, long, value_enum, default_value = "table")]
        output: fleet_cmd::Format,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Why a request would be routed, denied or fail: the proxies answer from their own
    /// config and live endpoint state (route and why higher ones did not match, authorization
    /// policy and rule, backend and endpoints, rate limits, retries, timeouts). Exits 0 for
    /// any answer, denied included; non-zero only when it cannot be answered.
    Explain {
        /// The request: a URL (`http://catalog/items`) or authority and path
        /// (`catalog/items`).
        target: Option<String>,
        /// The proxy that sends it, by node id (`trellis get proxies`).
        #[arg(long, conflicts_with = "from")]
        proxy: Option<String>,
        /// Or the calling service (`namespace/name` or `name`): one of its proxies.
        #[arg(long)]
        from: Option<String>,
        /// The caller's identity at the destination (a SPIFFE id or a service); default:
        /// the calling proxy's service.
        #[arg(long)]
        source: Option<String>,
        /// Method.
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        /// A request header, `'name: value'` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// A request seen in tap, by its id, instead of describing it; with `--access-log`,
        /// the `trace_id` or `request_id` of a line of that access log.
        #[arg(long)]
        request_id: Option<String>,
        /// The access log (a file, or `-` for stdin) whose line `--request-id` names; name
        /// the proxy that wrote it with `--proxy` or `--from`.
        #[arg(long, requires = "request_id", conflicts_with = "target")]
        access_log: Option<PathBuf>,
        /// Explain against the config as it would be with these resources applied (YAML,
        /// several documents), and say what changes.
        #[arg(long)]
        with: Option<PathBuf>,
        /// Only the named proxy's inbound side (authorization, inbound rate limits).
        #[arg(long)]
        inbound: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: explain_cmd::Output,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Check config files offline: exit 0 when valid, 1 with located errors when not. Route
    /// conditions that are not True (a backend that does not exist, …) are printed too.
    Validate {
        /// Files or directories (every `.yaml`/`.yml` inside, recursively).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Also exit 1 when any route condition is not True (for CI/CD pipelines).
        #[arg(long)]
        strict: bool,
    },
    /// Check the installation: control plane and version, store (and etcd), CA, clock
    /// skew, proxies in sync, certificates, trust bundle across replicas. One line per
    /// check, a hint when one does not pass; exit 1 on any failure.
    Check {
        /// Warn when the CA expires sooner than this (default 30 days).
        #[arg(long, default_value = "720h", value_parser = parse_duration)]
        ca_warn: Duration,
        /// Most clock skew allowed between this machine and the control plane.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        max_skew: Duration,
        /// How long a proxy behind the current config may take to catch up before it
        /// counts as stale.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        sync_grace: Duration,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Reports: `capacity` (per service load, CPU and memory, utilization and the
    /// recommended instance count, with its arithmetic).
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Start an app with its sidecar and register it with the control plane.
    Run {
        /// The service this app is an instance of (omit for a client-only app).
        #[arg(long)]
        service: Option<String>,
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The port the app listens on (passed to it as PORT).
        #[arg(long, requires = "service")]
        port: Option<u16>,
        /// The service port clients address (HTTP proxy mode's Host, backendRefs).
        #[arg(long, default_value_t = 80)]
        service_port: u16,
        /// NAME=LOCAL_PORT: the sidecar listens on 127.0.0.1:LOCAL_PORT for service NAME
        /// (NAMESPACE/NAME for a service in another namespace).
        #[arg(long = "upstream", value_parser = parse_upstream)]
        upstreams: Vec<(String, u16)>,
        /// KEY=VALUE labels on the instance (for example version=v2).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Locality zone of the instance and its sidecar (the sidecar prefers endpoints in
        /// its own zone, cluster and region).
        #[arg(long, env = "TRELLIS_ZONE")]
        zone: Option<String>,
        /// Locality region.
        #[arg(long, env = "TRELLIS_REGION")]
        region: Option<String>,
        /// Locality cluster.
        #[arg(long, env = "TRELLIS_CLUSTER")]
        cluster: Option<String>,
        /// Health check: tcp, http:/PATH or none.
        #[arg(long, default_value = "tcp")]
        health: run::Probe,
        /// How often the app is checked.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        health_interval: Duration,
        /// Registration lease: the instance leaves rotation this long after its sidecar vanishes.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        ttl: Duration,
        /// The IP other sidecars reach this one on.
        #[arg(long, default_value = "127.0.0.1")]
        advertise: std::net::IpAddr,
        /// Where the sidecar persists its last accepted config and its certificate.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Join token for the sidecar's first certificate (trellis token create); without
        /// one (and no persisted certificate) it runs without mutual TLS. Prefer
        /// TRELLIS_TOKEN or --token-file: arguments show in /proc/PID/cmdline.
        #[arg(long, env = "TRELLIS_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the join token from this file (owner-only).
        #[arg(long, env = "TRELLIS_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        control: ControlArg,
        /// The app and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run the demo: control plane, four services with sidecars, and load.
    Demo {
        /// Control plane address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Load generator requests per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Keep state and logs here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// How `trellis run` starts its app: this process arms a parent-death signal (so the
    /// app dies with `trellis run`, even on SIGKILL), then becomes the app.
    #[command(hide = true)]
    ExecApp {
        /// The `trellis run` process the app belongs to.
        #[arg(long)]
        parent: u32,
        /// The app and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// One demo service (used by `trellis demo`).
    #[command(hide = true)]
    DemoApp {
        /// product-catalog, order-processing, inventory, payment or load-generator.
        name: String,
    },
    /// A fixed-capacity server for the overload benchmark: `capacity` requests at once, each
    /// taking `service-time`; the rest queue.
    #[command(hide = true)]
    CapacityApp {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Requests served at once.
        #[arg(long, default_value_t = 16)]
        capacity: usize,
        /// Time each request takes, for example `20ms`.
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        service_time: Duration,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token that grants one service's identity (or, with --read-only, read access
    /// to the API and the dashboard); printed once.
    Create {
        /// The service (service account) the token grants.
        #[arg(long, required_unless_present = "read_only")]
        service: Option<String>,
        /// A read-only API token instead: it may read everything under /v1 but tokens, and
        /// ask for explanations; nothing else (the dashboard's login takes it).
        #[arg(long, conflicts_with_all = ["service", "uses"])]
        read_only: bool,
        /// Its namespace.
        #[arg(long, short, default_value = "default")]
        namespace: String,
        /// How long the token can be used (default 1h; 12h with --read-only).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many sidecars may use it (each use issues one certificate; default 1).
        #[arg(long)]
        uses: Option<u32>,
        #[command(flatten)]
        control: ControlArg,
    },
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Per service: request rate, latency, errors, CPU and memory of sidecars and apps,
    /// utilization, and the instances needed for a latency objective at a target
    /// utilization, with the arithmetic.
    Capacity {
        /// The p99 latency objective (default: the control plane's, 200ms).
        #[arg(long, value_parser = parse_duration)]
        latency_objective: Option<Duration>,
        /// The CPU utilization to aim for, 0-1 (default: the control plane's, 0.6).
        #[arg(long, value_parser = parse_utilization)]
        target_utilization: Option<f64>,
        /// CPUs of one instance (default: what its sidecars report).
        #[arg(long)]
        cores_per_instance: Option<f64>,
        /// The recent window the figures cover (5s to 10m).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        window: Duration,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: fleet_cmd::Format,
        #[command(flatten)]
        control: ControlArg,
    },
}

/// What the fleet view commands select.
#[derive(clap::Args)]
struct FleetSelect {
    /// Only this namespace.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Only this route (its id, `namespace/route/rule`, or the route's name).
    #[arg(long)]
    route: Option<String>,
    /// The recent window the figures cover (at most 10m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    window: Duration,
}

impl FleetSelect {
    fn with(self, service: Option<String>) -> fleet_cmd::Select {
        fleet_cmd::Select {
            window: self.window,
            namespace: self.namespace,
            service,
            route: self.route,
        }
    }
}

#[derive(clap::Args)]
struct ControlArg {
    /// Control plane URL.
    #[arg(
        long = "control",
        env = "TRELLIS_CONTROL",
        default_value = "https://127.0.0.1:7070"
    )]
    url: String,
    /// The control plane's trust bundle; default: ca.pem beside the admin token file
    /// (TRELLIS_ADMIN_TOKEN_FILE, else trellis-data/).
    #[arg(long, env = "TRELLIS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow an http:// URL (plaintext; tests and benchmarks only).
    #[arg(long, env = "TRELLIS_INSECURE")]
    insecure: bool,
}

/// A join token from `--token`/TRELLIS_TOKEN or `--token-file`/TRELLIS_TOKEN_FILE.
fn read_token(token: Option<String>, file: Option<PathBuf>) -> Result<Option<String>> {
    let Some(file) = file else {
        return Ok(token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()));
    };
    trellis_identity::files::check_private(&file).context("--token-file")?;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("--token-file {}", file.display()))?;
    let t = text.trim();
    if t.is_empty() {
        bail!("--token-file {}: the file is empty", file.display());
    }
    Ok(Some(t.to_string()))
}

/// The control channel's security for a sidecar.
fn control_tls(
    url: &str,
    insecure: bool,
    ca_file: Option<&Path>,
    token: Option<String>,
) -> Result<trellis_proxy::control::ControlTls> {
    client::check_url(url, insecure)?;
    if insecure {
        tracing::warn!(control = %url, "--insecure: the control channel may be plaintext");
    }
    let ca_bundle = match ca_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("--ca-file {}", f.display()))?)
        }
        None => None,
    };
    Ok(trellis_proxy::control::ControlTls {
        insecure,
        ca_bundle,
        token,
    })
}

fn parse_upstream(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=LOCAL_PORT"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
    trellis_api::meta::check_name(name.rsplit('/').next().unwrap_or(name))?;
    Ok((name.to_string(), port))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: use KEY=VALUE"))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// A target utilization: a share in (0, 1].
fn parse_utilization(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(u) if u > 0.0 && u <= 1.0 => Ok(u),
        _ => Err(format!(
            "{s:?}: a share between 0 (excluded) and 1, like 0.6"
        )),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    trellis_api::duration::parse(s).map(|d| d.get())
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A sidecar raises its file limit to the hard limit before opening anything: each client
/// connection holds a descriptor, opaque TCP two. The default connection caps follow it.
fn raise_file_limit() {
    let (limit, error) = trellis_proxy::limits::raise_file_limit();
    let (soft, hard) = (limit.soft, limit.hard);
    match error {
        None => tracing::info!(?soft, ?hard, "file limit"),
        Some(e) => tracing::warn!(?soft, ?hard, error = %e, "file limit: cannot raise it"),
    }
}

/// Readiness events per wait on the I/O driver for everything but the data path (tokio's
/// default).
const DEFAULT_IO_BATCH: u32 = 1024;

/// Readiness events per wait on a sidecar's data path. A pass over fewer connections hands
/// the next hop smaller batches sooner, so the hops overlap instead of taking turns; on the
/// 2-core bench machine, 16 bought 6–12% more requests per second through two sidecars for
/// about the same CPU per request (bench/RESULTS.md, "session 29").
const PROXY_IO_BATCH: u32 = 16;

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    runtime_with(threads, DEFAULT_IO_BATCH)
}

/// A runtime for `threads` that takes at most `io_batch` readiness events per wait.
fn runtime_with(threads: usize, io_batch: u32) -> Result<tokio::runtime::Runtime> {
    // One thread: the current-thread scheduler, with no cross-thread work stealing.
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .thread_name("trellis")
        .max_io_events_per_tick(io_batch.max(1) as usize)
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn run(command: Command) -> Result<i32> {
    if matches!(command, Command::Proxy { .. } | Command::Run { .. }) {
        raise_file_limit();
    }
    match command {
        Command::Validate { files, strict } => validate(&files, strict),
        Command::Proxy {
            config,
            control,
            state_dir,
            node_id,
            token,
            token_file,
            ca_file,
            insecure,
            threads,
            io_batch,
            watch_interval,
        } => runtime_with(threads, io_batch)?.block_on(async move {
            match control {
                Some(url) => {
                    let tls = control_tls(
                        &url,
                        insecure,
                        ca_file.as_deref(),
                        read_token(token, token_file)?,
                    )?;
                    proxy_following(config, url, state_dir, node_id, tls).await
                }
                None => proxy(config, watch_interval).await,
            }
        }),
        Command::Control {
            listen,
            store,
            default_ttl,
            trust_domain,
            cert_ttl,
            ca_cert,
            ca_key,
            ca_chain,
            ca_bundle,
            admin_token_file,
            ca_key_file,
            tls_names,
            insecure,
            max_connections,
            handshake_timeout,
            idle_timeout,
            capacity_latency_objective,
            capacity_target_utilization,
            etcd_compaction_interval,
            read_budget_mib,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let ca = match (ca_cert, ca_key) {
                (Some(cert), Some(key)) => {
                    trellis_identity::files::check_private(&key).context("--ca-key")?;
                    let cert_pem = read(&cert)?;
                    Some(trellis_identity::CaMaterial {
                        bundle_pem: match &ca_bundle {
                            Some(b) => read(b)?,
                            None => cert_pem.clone(),
                        },
                        cert_pem,
                        key_pem: read(&key)?,
                        chain_pem: match &ca_chain {
                            Some(c) => read(c)?,
                            None => String::new(),
                        },
                    })
                }
                _ => None,
            };
            let admin_token_file = admin_token_file.or_else(|| match StoreSpec::parse(&store) {
                Ok(StoreSpec::Dir(d)) => Some(d.join("admin-token")),
                _ => Some(PathBuf::from("trellis-admin-token")),
            });
            let ca_file = admin_token_file
                .as_ref()
                .and_then(|f| f.parent())
                .map(|d| d.join("ca.pem"));
            let settings = trellis_control::Settings {
                admin_token_file,
                ca_file,
                insecure,
                server_names: tls_names,
                limits: trellis_control::Limits {
                    handshake_timeout,
                    idle_timeout,
                    max_connections,
                },
                default_ttl,
                capacity: trellis_control::capacity::Objective {
                    latency_objective: capacity_latency_objective,
                    target_utilization: capacity_target_utilization,
                    cores_per_instance: None,
                },
                identity: trellis_control::identity::IdentitySettings {
                    trust_domain,
                    cert_ttl,
                    ca,
                    key_file: ca_key_file,
                },
                store_compaction: etcd_compaction_interval,
                read_budget: usize::try_from(read_budget_mib << 20).unwrap_or(usize::MAX),
            };
            runtime(default_threads())?.block_on(control(listen, store, settings))
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    service,
                    read_only,
                    namespace,
                    ttl,
                    uses,
                    control,
                },
        } => runtime(1)?.block_on(async move {
            if read_only {
                let ttl = ttl.unwrap_or(Duration::from_secs(12 * 3600));
                let body = serde_json::json!({
                    "readOnly": true,
                    "ttl_seconds": ttl.as_secs().max(1),
                });
                let v: serde_json::Value = api(&control)?.post("/v1/tokens", &body).await?;
                println!("{}", v["token"].as_str().unwrap_or_default());
                eprintln!(
                    "read-only token, valid until {} (Unix {}); log in to the dashboard ({}/ui/) with it, or pass it to the CLI as TRELLIS_ADMIN_TOKEN for reads",
                    trellis_control::config::rfc3339(v["expiresAt"].as_u64().unwrap_or(0)),
                    v["expiresAt"],
                    control.url.trim_end_matches('/'),
                );
                return Ok(0);
            }
            let service = service.unwrap_or_default();
            let (ttl, uses) = (ttl.unwrap_or(Duration::from_secs(3600)), uses.unwrap_or(1));
            let body = serde_json::json!({
                "service": service,
                "namespace": namespace,
                "ttl_seconds": ttl.as_secs().max(1),
                "uses": uses,
            });
            let v: serde_json::Value = api(&control)?.post("/v1/tokens", &body).await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
            eprintln!(
                "token for ns/{namespace}/sa/{service}, {uses} use(s), valid until {} (Unix {}); pass it to trellis run with TRELLIS_TOKEN or --token-file",
                trellis_control::config::rfc3339(v["expiresAt"].as_u64().unwrap_or(0)),
                v["expiresAt"]
            );
            Ok(0)
        }),
        Command::Apply {
            files,
            dry_run,
            control,
        } => runtime(1)?
            .block_on(async move { config_cmd::apply(&api(&control)?, &files, dry_run).await }),
        Command::Get {
            kind,
            name,
            namespace,
            output,
            control,
        } => runtime(1)?.block_on(async move {
            config_cmd::get(
                &api(&control)?,
                &kind,
                name.as_deref(),
                namespace.as_deref(),
                output,
            )
            .await
        }),
        Command::Stat {
            service,
            select,
            output,
            control,
        } => runtime(1)?.block_on(async move {
            fleet_cmd::stat(&api(&control)?, &select.with(service), output).await
        }),
        Command::Top {
            service,
            select,
            interval,
            once,
            control,
        } => runtime(1)?.block_on(async move {
            fleet_cmd::top(&api(&control)?, &select.with(service), interval, once).await
        }),
        Command::Edges {
            service,
            select,
            output,
            control,
        } => runtime(1)?.block_on(async move {
            fleet_cmd::edges(&api(&control)?, &select.with(service), output).await
        }),
        Command::Tap {
            service,
            namespace,
            route,
            path,
            method,
            status,
            direction,
            show_headers,
            redact,
            max,
            duration,
            output,
            control,
        } => runtime(1)?.block_on(async move {
            let args = fleet_cmd::TapArgs {
                namespace,
                service,
                route,
                path,
                method,
                status,
                direction,
                show_headers,
                redact,
                max,
                duration,
            };
            fleet_cmd::tap(&api(&control)?, args, output).await
        }),
        Command::Explain {
            target,
            proxy,
            from,
            source,
            method,
            headers,
            request_id,
            access_log,
            with,
            inbound,
            output,
            control,
        } => runtime(1)?.block_on(async move {
            let args = explain_cmd::Args {
                proxy,
                from,
                source,
                method,
                target,
                headers,
                request_id,
                access_log,
                with,
                inbound,
            };
            explain_cmd::explain(&api(&control)?, args, output).await
        }),
        Command::Delete {
            kind,
            names,
            namespace,
            files,
            control,
        } => runtime(1)?.block_on(async move {
            config_cmd::delete(&api(&control)?, kind, names, &namespace, &files).await
        }),
        Command::Run {
            service,
            namespace,
            port,
            service_port,
            upstreams,
            labels,
            zone,
            region,
            cluster,
            health,
            health_interval,
            ttl,
            advertise,
            state_dir,
            token,
            token_file,
            control,
            command,
        } => {
            let tls = control_tls(
                &control.url,
                control.insecure,
                control.ca_file.as_deref(),
                read_token(token, token_file)?,
            )?;
            runtime(2)?.block_on(run::run(run::RunOptions {
                service,
                namespace,
                port,
                service_port,
                upstreams,
                labels: labels.into_iter().collect(),
                zone,
                region,
                cluster,
                probe: health,
                probe_interval: health_interval,
                ttl,
                advertise,
                control: control.url,
                state_dir,
                tls,
                command,
            }))
        }
        Command::Demo {
            listen,
            rate,
            data_dir,
        } => runtime(2)?.block_on(demo::demo(demo::DemoOptions {
            listen,
            rate,
            data_dir,
        })),
        Command::Check {
            ca_warn,
            max_skew,
            sync_grace,
            control,
        } => runtime(1)?.block_on(async move {
            let o = check_cmd::Options {
                ca_warn,
                max_skew,
                sync_grace,
            };
            check_cmd::check(&control.url, control.insecure, control.ca_file, &o).await
        }),
        Command::Report {
            command:
                ReportCommand::Capacity {
                    latency_objective,
                    target_utilization,
                    cores_per_instance,
                    window,
                    output,
                    control,
                },
        } => runtime(1)?.block_on(async move {
            let args = capacity_cmd::Args {
                latency_objective,
                target_utilization,
                cores_per_instance,
                window,
            };
            capacity_cmd::report(&api(&control)?, &args, output).await
        }),
        Command::ExecApp { parent, command } => run::exec_app(parent, &command),
        Command::CapacityApp {
            listen,
            capacity,
            service_time,
        } => runtime(1)?.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            trellis_demo::capacity::serve(listener, capacity, service_time, shutdown_signal())
                .await;
            Ok(0)
        }),
        Command::DemoApp { name } => {
            let Some(app) = trellis_demo::App::parse(&name) else {
                bail!("unknown demo app {name:?}");
            };
            let config = trellis_demo::Config::from_env()?;
            runtime(1)?.block_on(async move {
                trellis_demo::run(app, config, shutdown_signal()).await?;
                Ok(0)
            })
        }
    }
}

fn api(control: &ControlArg) -> Result<client::Api> {
    client::Api::new(&control.url, control.insecure, control.ca_file.clone())
}

async fn control(
    listen: SocketAddr,
    store: String,
    settings: trellis_control::Settings,
) -> Result<i32> {
    let spec = StoreSpec::parse(&store).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
    let control = trellis_control::Control::open(&spec, settings)
        .await
        .with_context(|| format!("opening the store {store}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, store = %store, revision = control.state().revision, "control plane serving");
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(trellis_control::serve(control, listener, stop.clone()));
    shutdown_signal().await;
    tracing::info!("stopping");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(0)
}

async fn proxy_following(
    config: PathBuf,
    url: String,
    state_dir: PathBuf,
    node_id: Option<String>,
    tls: trellis_proxy::control::ControlTls,
) -> Result<i32> {
    let source = config.display().to_string();
    let text = std::fs::read_to_string(&config).with_context(|| format!("reading {source}"))?;
    let local = match trellis_api::parse_documents(&source, &text) {
        Ok(r) => r,
        Err(d) => bail!("invalid config:\n{d}"),
    };
    let name = local
        .iter()
        .find(|r| r.value.kind() == trellis_api::Kind::Proxy)
        .map_or("proxy".to_string(), |r| r.value.metadata().name.clone());
    let id = node_id.unwrap_or_else(|| format!("{name}-{}", std::process::id()));
    let node = run::node_for(id, "", &local);
    let (proxy, _) = run::start_sidecar(&url, local, node, &state_dir, tls).await?;
    tracing::info!(admin = %proxy.admin_addr(), control = %url, "proxy started");
    shutdown_signal().await;
    let deadline = proxy.snapshot().settings.drain_timeout;
    proxy.drain(deadline).await;
    Ok(0)
}

/// Reads every YAML file under `paths`, in a stable order.
pub(crate) fn read_files(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                if e.is_dir() || e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    walk(&e, out)?;
                }
            }
        } else {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        walk(p, &mut files)?;
    }
    files
        .into_iter()
        .map(|f| {
            Ok((
                f.display().to_string(),
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
            ))
        })
        .collect()
}

fn validate(paths: &[PathBuf], strict: bool) -> Result<i32> {
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    for (name, text) in read_files(paths)? {
        match trellis_api::parse_documents(&name, &text) {
            Ok(r) => resources.extend(r),
            Err(d) => problems.extend(d.0),
        }
    }
    if problems.is_empty()
        && let Err(d) = trellis_api::validate(&resources)
    {
        problems = d.0;
    }
    if problems.is_empty() {
        println!("{} resources valid", resources.len());
        let (routes, not_true) = print_route_conditions(&resources);
        if not_true == 0 {
            if routes > 0 {
                println!("{routes} route(s): every condition True");
            }
            Ok(0)
        } else if strict {
            eprintln!("--strict: {not_true} route condition(s) not True");
            Ok(1)
        } else {
            Ok(0)
        }
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s) found", problems.len());
        Ok(1)
    }
}

/// Prints, as `file:line: Kind ns/name: Type=Status (Reason): message`, each route condition
/// that is not True, as the control plane would report it for these files. Returns the
/// number of routes and of such conditions.
fn print_route_conditions(
    resources: &[trellis_api::Located<trellis_api::Resource>],
) -> (usize, usize) {
    let statuses = trellis_api::status::routes(resources.iter().map(|r| &r.value));
    let mut not_true = 0;
    for r in resources {
        let Some(status) = statuses.get(&r.value.key()) else {
            continue;
        };
        // ResolvedRefs is the same for every parent: say it once.
        let mut said = std::collections::BTreeSet::new();
        for c in status.parents.iter().flat_map(|p| &p.conditions) {
            if c.is_true() || !said.insert((&c.kind, &c.message)) {
                continue;
            }
            not_true += 1;
            let line = r.diagnostic(c.field.as_deref().unwrap_or(""), "").line;
            eprintln!(
                "{}:{line}: {}: {}={} ({}): {}",
                r.file,
                r.value.key(),
                c.kind,
                c.status,
                c.reason,
                c.message
            );
        }
    }
    (statuses.len(), not_true)
}

async fn proxy(config: PathBuf, watch_interval: Duration) -> Result<i32> {
    let source = config.display().to_string();
    let text = std::fs::read_to_string(&config).with_context(|| format!("reading {source}"))?;
    let resources = match trellis_api::parse_documents(&source, &text) {
        Ok(r) => r,
        Err(d) => bail!("invalid config:\n{d}"),
    };
    let proxy = trellis_proxy::Proxy::start(&resources, &source)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start:\n{e}"))?;
    tracing::info!(admin = %proxy.admin_addr(), "proxy started");
    tokio::spawn(trellis_proxy::watch_file(
        proxy.clone(),
        config,
        text.into_bytes(),
        watch_interval,
    ));
    shutdown_signal().await;
    let deadline = proxy.snapshot().settings.drain_timeout;
    tracing::info!(?deadline, "draining");
    if proxy.drain(deadline).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain deadline passed with work in flight");
    }
    Ok(0)
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
