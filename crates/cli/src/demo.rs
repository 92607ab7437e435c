//! `trellis demo`: a control plane on a temporary data directory, the four demo services
//! (product-catalog v1 and v2, order-processing, inventory, payment) each behind its sidecar
//! via `trellis run`, and a steady load generator. Ctrl-C stops everything.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use trellis_control::store::StoreSpec;

struct App {
    name: &'static str,
    child: Child,
}

/// A loopback port for a child to bind later. Taken below the kernel's ephemeral range
/// (32768 and up): a port from `bind(:0)` can meanwhile go to some process's outgoing
/// connection, and then the child cannot start.
fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Demos started side by side (tests) begin at different places in the range.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..22_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (start.wrapping_add(n.wrapping_mul(7)) % 22_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port between 10000 and 32000")
}

/// Options of `trellis demo`.
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub rate: u32,
    pub data_dir: Option<PathBuf>,
}

pub async fn demo(o: DemoOptions) -> Result<i32> {
    let dir = o.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()))
    });
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let listener = match tokio::net::TcpListener::bind(o.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{} is busy ({e}); using a free port instead", o.listen);
            tokio::net::TcpListener::bind("127.0.0.1:0").await?
        }
    };
    let control_addr = listener.local_addr()?;
    let control_url = format!("https://{control_addr}");
    let admin_token_file = dir.join("admin-token");
    let control = trellis_control::Control::open(
        &StoreSpec::Dir(dir.join("store")),
        trellis_control::Settings {
            admin_token_file: Some(admin_token_file.clone()),
            // The CLI finds it beside the admin token (TRELLIS_ADMIN_TOKEN_FILE).
            ca_file: Some(dir.join("ca.pem")),
            ..trellis_control::Settings::default()
        },
    )
    .await?;
    // Every sidecar gets an identity (a join token per service), so all demo traffic between
    // sidecars is mutual TLS.
    let mut tokens = std::collections::HashMap::new();
    for svc in [
        "product-catalog",
        "inventory",
        "payment",
        "order-processing",
        "load-generator",
    ] {
        // product-catalog runs two instances, each sidecar spends one use.
        let (t, _) = control
            .create_token("default", svc, Duration::from_secs(3600), 2)
            .await
            .map_err(|e| anyhow::anyhow!("creating a join token: {e}"))?;
        tokens.insert(svc, t);
    }
    let stop_control = CancellationToken::new();
    let server = tokio::spawn(trellis_control::serve(
        control,
        listener,
        stop_control.clone(),
    ));

    let exe = std::env::current_exe().context("finding the trellis binary")?;
    let (catalog_up, inventory_up, payment_up, orders_up) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let spawn = |name: &'static str,
                 service: Option<&str>,
                 labels: &[&str],
                 upstreams: &[(&str, u16)],
                 env: &[(&str, String)]|
     -> Result<App> {
        let mut cmd = Command::new(&exe);
        cmd.arg("--log")
            .arg("info")
            .arg("run")
            .arg("--control")
            .arg(&control_url);
        cmd.arg("--state-dir").arg(dir.join("sidecars").join(name));
        if let Some(s) = service {
            cmd.arg("--service")
                .arg(s)
                .arg("--port")
                .arg(free_port()?.to_string());
            cmd.arg("--health")
                .arg("http:/healthz")
                .arg("--ttl")
                .arg("5s");
        }
        for l in labels {
            cmd.arg("--label").arg(l);
        }
        for (svc, port) in upstreams {
            cmd.arg("--upstream").arg(format!("{svc}={port}"));
        }
        let app = if name.starts_with("product-catalog") {
            "product-catalog"
        } else {
            name
        };
        cmd.arg("--").arg(&exe).arg("demo-app").arg(app);
        if let Some(t) = tokens.get(service.unwrap_or(name)) {
            cmd.env("TRELLIS_TOKEN", t);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        cmd.stderr(log.try_clone()?);
        // The load generator's summaries are the demo's heartbeat on the terminal.
        if name == "load-generator" {
            cmd.stdout(std::process::Stdio::inherit());
        } else {
            cmd.stdout(log);
        }
        let child = cmd
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(App { name, child })
    };
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let mut apps = vec![
        spawn(
            "product-catalog-v1",
            Some("product-catalog"),
            &["version=v1"],
            &[],
            &[("DEMO_VERSION", "v1".into())],
        )?,
        spawn(
            "product-catalog-v2",
            Some("product-catalog"),
            &["version=v2"],
            &[],
            &[("DEMO_VERSION", "v2".into())],
        )?,
        spawn("inventory", Some("inventory"), &[], &[], &[])?,
        spawn("payment", Some("payment"), &[], &[], &[])?,
        spawn(
            "order-processing",
            Some("order-processing"),
            &[],
            &[
                ("product-catalog", catalog_up),
                ("inventory", inventory_up),
                ("payment", payment_up),
            ],
            &[
                ("CATALOG_URL", url(catalog_up)),
                ("INVENTORY_URL", url(inventory_up)),
                ("PAYMENT_URL", url(payment_up)),
            ],
        )?,
        spawn(
            "load-generator",
            None,
            &[],
            &[("order-processing", orders_up)],
            &[("TARGET_URL", url(orders_up)), ("RATE", o.rate.to_string())],
        )?,
    ];
    print_banner(
        &control_url,
        &cli_name(&exe),
        &dir,
        &logs,
        orders_up,
        &admin_token_file,
    );

    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    let mut running = apps.len();
    loop {
        tokio::select! {
            () = &mut signal => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                for a in &mut apps {
                    if let Ok(Some(status)) = a.child.try_wait() && running > 0 {
                        eprintln!("demo: {} exited ({status}); see {}", a.name, logs.join(format!("{}.log", a.name)).display());
                        running -= 1;
                    }
                }
                apps.retain_mut(|a| !matches!(a.child.try_wait(), Ok(Some(_))));
            }
        }
    }
    eprintln!("\ndemo: stopping {} processes…", apps.len());
    stop_all(&mut apps).await;
    stop_control.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if o.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!("demo: stopped");
    Ok(0)
}

/// SIGTERM to every child (each `trellis run` stops its app and deregisters), then SIGKILL
/// to any still running after 10 s.
async fn stop_all(apps: &mut [App]) {
    for a in apps.iter() {
        if let Some(pid) = a.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for a in apps.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), a.child.wait())
            .await
            .is_err()
        {
            eprintln!("demo: {} did not stop in 10s; killing it", a.name);
            let _ = a.child.kill().await;
        }
    }
}

/// How the user should invoke this binary from another terminal: `trellis` when that is on
/// PATH, else its path (relative to the current directory when under it).
fn cli_name(exe: &Path) -> String {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("trellis") == exe));
    if on_path {
        return "trellis".into();
    }
    match std::env::current_dir()
        .ok()
        .and_then(|d| exe.strip_prefix(d).ok().map(Path::to_path_buf))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

fn print_banner(control: &str, cli: &str, dir: &Path, logs: &Path, orders: u16, token: &Path) {
    let mut env = if control == "https://127.0.0.1:7070" {
        String::new()
    } else {
        format!("  export TRELLIS_CONTROL={control}\n")
    };
    env.push_str(&format!(
        "  export TRELLIS_ADMIN_TOKEN_FILE={}   # the admin token; ca.pem beside it verifies the control plane\n",
        token.display()
    ));
    println!(
        r#"
Trellis demo is running.

  control plane   {control}   (data in {dir})
  dashboard       {control}/ui/   log in with the admin token: the contents of
                  {token}   (or a read-only token:
                  {cli} token create --read-only); the browser will warn about the
                  certificate: the demo's own CA (ca.pem beside the token) signed it
  services        product-catalog (v1, v2), order-processing, inventory, payment;
                  every sidecar has a SPIFFE identity and they talk mutual TLS
  load            order-processing via the load generator's sidecar (127.0.0.1:{orders})
  logs            {logs}

Try, in another terminal:
{env}  {cli} get workloads          # registered instances and their health
  {cli} get proxies            # every sidecar and the config it acknowledged
  {cli} apply -f demo/canary.yaml   # 90/10 split of product-catalog v1/v2
  {cli} get httproutes -o yaml
  {cli} delete -f demo/canary.yaml  # back to an even split across instances
  {cli} stat                   # per service: success rate, requests/s, p50/p95/p99 (top: live)
  {cli} edges                  # who calls whom, with identities and mutual TLS
  {cli} tap --max 20           # live requests (sensitive headers redacted)

The load generator prints a summary every 5 s, counting catalog versions: watch it follow
the canary. Ctrl-C stops everything.
"#,
        dir = dir.display(),
        logs = logs.display(),
        token = token.display(),
    );
}
