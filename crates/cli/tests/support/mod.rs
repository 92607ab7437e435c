//! Processes and a plain HTTP/1.1 client for tests that run the real `trellis` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_trellis")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A loopback port nothing listens on, for a process to bind later. It is taken below the
/// kernel's ephemeral range (32768 and up): a port from `bind(:0)` can be handed to another
/// test's outgoing connection before the process that was meant to bind it starts.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Tests run as separate processes: each starts at its own place in the range.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..22_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (start.wrapping_add(n.wrapping_mul(7)) % 22_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below 32000");
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "trellis-test-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process with its log in a file; stopped with SIGTERM (then SIGKILL) on drop, with
/// its own children, so no test leaves processes behind.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children(all[i]);
        all.extend(kids);
        i += 1;
    }
    all
}

pub fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, mut cmd: Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null());
        let child = cmd.spawn().unwrap();
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL this process and everything under it (a crash, not a shutdown).
    pub fn kill_hard(&mut self) {
        let all = tree(self.pid());
        for p in &all {
            signal(*p, "KILL");
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for exit; SIGKILL after.
    pub fn stop(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let all = tree(self.pid());
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                for p in &all[1..] {
                    if alive(*p) {
                        signal(*p, "KILL");
                    }
                }
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &all {
            signal(*p, "KILL");
        }
        let _ = self.child.wait();
        None
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.exited() {
            self.stop(Duration::from_secs(5));
        }
        // A failed test shows what every process it started said last.
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!("--- last lines of {} ---\n{}", self.name, tail.join("\n"));
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded to 5 s.
pub fn http(method: &str, port: u16, path: &str, body: &str) -> std::io::Result<Response> {
    http_with(method, port, path, &[], body)
}

/// [`http`] with extra request headers.
pub fn http_with(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    exchange(s, method, port, &extra, path, body)
}

/// One HTTP/1.1 request over TLS to the control plane on `port`, verified with the trust
/// bundle in `ca`.
pub fn https(
    method: &str,
    port: u16,
    path: &str,
    body: &str,
    ca: &Path,
) -> std::io::Result<Response> {
    https_with(method, port, path, "", body, ca)
}

/// [`https`] with extra request header lines (`name: value\r\n` each).
pub fn https_with(
    method: &str,
    port: u16,
    path: &str,
    extra: &str,
    body: &str,
    ca: &Path,
) -> std::io::Result<Response> {
    let bundle = std::fs::read_to_string(ca)?;
    let config = trellis_identity::control::control_client_config(
        &trellis_identity::ControlTrust::Bundle(bundle),
        None,
        &[b"http/1.1"],
    )
    .map_err(std::io::Error::other)?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(
        rustls::StreamOwned::new(conn, tcp),
        method,
        port,
        extra,
        path,
        body,
    )
}

fn exchange<S: Read + Write>(
    mut s: S,
    method: &str,
    port: u16,
    extra: &str,
    path: &str,
    body: &str,
) -> std::io::Result<Response> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{extra}connection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut body = String::new();
    match r.read_to_string(&mut body) {
        Ok(_) => {}
        // A peer that closes without TLS close_notify: the body read so far stands.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    http("GET", port, path, "")
}

/// A GET with one extra request header, on a fresh connection, bounded to 5 s.
pub fn get_with(port: u16, path: &str, header: (&str, &str)) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n{}: {}\r\n\r\n",
        header.0, header.1
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut body = String::new();
    let _ = r.read_to_string(&mut body);
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A running `trellis control`.
pub struct ControlPlane {
    pub proc: Proc,
    pub port: u16,
    /// The admin token's file.
    pub token: PathBuf,
}

impl ControlPlane {
    pub fn start(name: &str, dir: &Path, port: u16, store: &str) -> ControlPlane {
        Self::start_with(name, dir, port, store, &[])
    }

    /// Like [`ControlPlane::start`], with more `trellis control` flags.
    pub fn start_with(
        name: &str,
        dir: &Path,
        port: u16,
        store: &str,
        flags: &[&str],
    ) -> ControlPlane {
        let mut cmd = trellis();
        cmd.args([
            "control",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            store,
        ]);
        cmd.args(flags);
        // Replicas started in one directory share the token the first one created, and
        // the trust bundle (ca.pem) beside it.
        let token = dir.join("admin-token");
        cmd.arg("--admin-token-file").arg(&token);
        let mut proc = Proc::spawn(name, dir, cmd);
        let ca = dir.join("ca.pem");
        wait_for(
            Duration::from_secs(60),
            "the control plane to listen",
            || {
                if proc.exited() {
                    panic!("control plane exited:\n{}", proc.log_text());
                }
                https("GET", port, "/live", "", &ca)
                    .ok()
                    .filter(|r| r.status == 200)
            },
        );
        ControlPlane { proc, port, token }
    }

    /// The trust bundle the control plane wrote beside its admin token.
    pub fn ca(&self) -> PathBuf {
        self.token.with_file_name("ca.pem")
    }

    /// One request to the control plane's API over TLS.
    pub fn https(&self, method: &str, path: &str, body: &str) -> std::io::Result<Response> {
        https(method, self.port, path, body, &self.ca())
    }

    /// A GET of the config API with the admin token.
    pub fn api_get(&self, path: &str) -> std::io::Result<Response> {
        let token = std::fs::read_to_string(&self.token)?;
        let auth = format!("authorization: Bearer {}\r\n", token.trim());
        https_with("GET", self.port, path, &auth, "", &self.ca())
    }

    /// A control plane named `control` on a free port, its store in `dir/store`.
    pub fn start_in(dir: &Path) -> ControlPlane {
        let store = dir.join("store").display().to_string();
        ControlPlane::start("control", dir, free_port(), &store)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs a CLI command against this control plane: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli(&self.url(), &self.token, args)
    }
}

/// Runs a CLI command against the control plane at `url` with the admin token in
/// `token_file`: (exit code, stdout, stderr).
pub fn cli(url: &str, token_file: &Path, args: &[&str]) -> (i32, String, String) {
    let out = trellis()
        .args(args)
        .env("TRELLIS_CONTROL", url)
        .env("TRELLIS_ADMIN_TOKEN_FILE", token_file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A join token for `service`, created through the CLI.
pub fn token(cp: &ControlPlane, service: &str) -> String {
    let (code, out, err) = cp.cli(&["token", "create", "--service", service]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// The node id of the first proxy `trellis get proxies` lists with a non-empty `upstreams`
/// (a client started by [`client`]).
pub fn client_node(cp: &ControlPlane) -> String {
    let (code, out, err) = cp.cli(&["get", "proxies", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let proxies: serde_json::Value = serde_json::from_str(&out).unwrap();
    let items = proxies["items"].as_array().or(proxies.as_array()).unwrap();
    items
        .iter()
        .find(|p| p["upstreams"].as_array().is_some_and(|u| !u.is_empty()))
        .and_then(|p| p["node"].as_str())
        .unwrap_or_else(|| panic!("the client's proxy in {out}"))
        .to_string()
}

/// The ceiling of every wait for a readiness signal: generous, since a loaded CI machine can
/// take many times longer than a quiet one, and a wait returns as soon as its signal shows.
pub const READY: Duration = Duration::from_secs(60);

/// The smallest mesh the CLI tests explain, check and measure: a control plane, catalog v1
/// behind its sidecar, and a client sidecar whose upstream port `up` already reaches it.
pub struct SmallMesh {
    pub cp: ControlPlane,
    pub up: u16,
    pub catalog: Proc,
    pub client: Proc,
}

pub fn small_mesh(dir: &TempDir) -> SmallMesh {
    let cp = ControlPlane::start_in(dir.path());
    let catalog = catalog(dir.path(), &cp.url(), "v1", &token(&cp, "product-catalog"));
    let up = free_port();
    let client = client(
        dir.path(),
        &cp.url(),
        up,
        "client-state",
        &token(&cp, "client"),
    );
    wait_versions(up, &["v1"], READY);
    SmallMesh {
        cp,
        up,
        catalog,
        client,
    }
}

/// `trellis run` of a demo catalog instance.
pub fn catalog(dir: &Path, control: &str, version: &str, token: &str) -> Proc {
    let mut cmd = trellis();
    cmd.args([
        "run",
        "--control",
        control,
        "--service",
        "product-catalog",
        "--port",
        &free_port().to_string(),
        "--label",
        &format!("version={version}"),
        "--health",
        "http:/healthz",
        "--ttl",
        "2s",
        "--token",
        token,
        "--state-dir",
    ])
    .arg(dir.join(format!("state-catalog-{version}-{}", free_port())))
    .args(["--", bin(), "demo-app", "product-catalog"])
    .env("DEMO_VERSION", version);
    Proc::spawn(&format!("catalog-{version}"), dir, cmd)
}

/// `trellis run` of a client-only app whose sidecar listens on `port` for product-catalog.
pub fn client(dir: &Path, control: &str, port: u16, state: &str, token: &str) -> Proc {
    let mut cmd = trellis();
    cmd.args([
        "run",
        "--control",
        control,
        "--upstream",
        &format!("product-catalog={port}"),
        "--token",
        token,
        "--state-dir",
    ])
    .arg(dir.join(state))
    .args(["--", "sleep", "600"]);
    Proc::spawn(&format!("client-{port}"), dir, cmd)
}

/// The catalog versions that answer `n` requests through the sidecar on `port` (`"503"` etc.
/// for failures).
pub fn versions(port: u16, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let key = match get(port, "/products/1") {
            Ok(r) if r.status == 200 => r
                .headers
                .get("x-demo-version")
                .cloned()
                .unwrap_or_else(|| "no-version".into()),
            Ok(r) => r.status.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Waits until `n` requests in a row are answered only by `want` versions.
pub fn wait_versions(port: u16, want: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    let deadline = start + limit;
    loop {
        let v = versions(port, 20);
        if v.len() == want.len() && want.iter().all(|w| v.contains_key(*w)) {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for only {want:?} to answer; the last 20: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `trellis run` with JSON logs (so tests can read its admin address), `args` before `--`
/// and the app after.
pub fn run(dir: &Path, name: &str, args: &[&str], app: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = trellis();
    cmd.args(["--log-format", "json", "run"]).args(args);
    cmd.arg("--state-dir")
        .arg(dir.join(format!("state-{name}")));
    cmd.arg("--").args(app);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(name, dir, cmd)
}

/// The admin port a `trellis run` sidecar logged.
pub fn admin_port(p: &Proc) -> u16 {
    wait_for(
        Duration::from_secs(60),
        "the sidecar's admin address",
        || {
            // JSON logs, or text ones (without their colours).
            let mut log = String::new();
            let mut in_escape = false;
            for c in p.log_text().chars() {
                match c {
                    '\x1b' => in_escape = true,
                    'm' if in_escape => in_escape = false,
                    _ if in_escape => {}
                    c => log.push(c),
                }
            }
            for key in ["\"admin\":\"127.0.0.1:", "admin=127.0.0.1:"] {
                if let Some(i) = log.find(key) {
                    let rest = &log[i + key.len()..];
                    let end = rest.find(|c: char| !c.is_ascii_digit())?;
                    return rest[..end].parse().ok();
                }
            }
            None
        },
    )
}

/// One metric's value from an admin port (the first series whose line starts with `prefix`).
pub fn metric(admin: u16, prefix: &str) -> Option<f64> {
    let r = get(admin, "/metrics").ok()?;
    r.body
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An HTTP/1.1 client that keeps one connection open across requests, as an app's client
/// library does (responses must carry `content-length`).
pub struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(port: u16) -> KeepAlive {
        KeepAlive { port, conn: None }
    }

    /// GET `path` on the open connection (a new one if there is none), bounded to 10 s.
    pub fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let r = self.exchange(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn exchange(&mut self, path: &str) -> std::io::Result<Response> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(("127.0.0.1", self.port))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                // The request goes out in several writes: without this, Nagle's algorithm
                // and delayed ACKs hold each request back about 40 ms.
                s.set_nodelay(true)?;
                self.conn.insert(BufReader::new(s))
            }
        };
        write!(
            conn.get_mut(),
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\n\r\n",
            self.port
        )?;
        let (status, headers) = read_head(conn)?;
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        if headers.get("connection").is_some_and(|v| v == "close") {
            self.conn = None;
        }
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// `trellis run` of a product-catalog instance whose app listens on `port`, with JSON logs
/// and its state in `dir/state-NAME` (so a restart under the same name keeps its identity).
pub fn catalog_on(
    dir: &Path,
    name: &str,
    control: &str,
    port: u16,
    version: &str,
    token: &str,
) -> Proc {
    catalog_with(dir, name, control, port, version, token, &["--ttl", "2s"])
}

/// Like [`catalog_on`], with `flags` for `trellis run` instead of the short 2 s lease.
pub fn catalog_with(
    dir: &Path,
    name: &str,
    control: &str,
    port: u16,
    version: &str,
    token: &str,
    flags: &[&str],
) -> Proc {
    catalog_env(dir, name, control, port, version, token, flags, &[])
}

/// Like [`catalog_with`], with more environment for the app (`FAIL_STATUS`, `LATENCY_MS`).
#[allow(clippy::too_many_arguments)]
pub fn catalog_env(
    dir: &Path,
    name: &str,
    control: &str,
    port: u16,
    version: &str,
    token: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let port = port.to_string();
    let label = format!("version={version}");
    let mut args = vec![
        "--control",
        control,
        "--service",
        "product-catalog",
        "--port",
        &port,
        "--label",
        &label,
        "--health",
        "http:/healthz",
        "--token",
        token,
    ];
    args.extend_from_slice(flags);
    run(
        dir,
        name,
        &args,
        &[bin(), "demo-app", "product-catalog"],
        &[&[("DEMO_VERSION", version)], env].concat(),
    )
}

/// The endpoint addresses of `service` in the config the sidecar with admin port `admin` has
/// applied (its `/config`): a readiness signal that needs no traffic.
pub fn sidecar_endpoints(admin: u16, service: &str) -> Option<Vec<String>> {
    let r = get(admin, "/config").ok().filter(|r| r.status == 200)?;
    let doc: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    let svc = doc["resources"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == "Service" && r["metadata"]["name"] == service)?;
    Some(
        svc["spec"]["endpoints"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["address"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Waits (bounded) until the sidecar with admin port `admin` is ready and has applied config
/// with exactly `n` endpoints for `service`.
pub fn wait_endpoints(admin: u16, service: &str, n: usize) {
    wait_for(
        Duration::from_secs(60),
        &format!("the sidecar to apply {n} endpoint(s) of {service}"),
        || {
            let ready = get(admin, "/ready").ok()?.status == 200;
            (ready && sidecar_endpoints(admin, service)?.len() == n).then_some(())
        },
    );
}

/// An HTTP/1.1 response's status and headers (names lowercased), read up to the blank line.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, BTreeMap<String, String>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok((status, headers))
}
