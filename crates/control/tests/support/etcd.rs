//! A real etcd for tests: `let etcd = Etcd::start();` runs Debian's `/usr/bin/etcd` on free
//! loopback ports in a fresh temporary directory, and dropping it kills that process and
//! removes the directory. Include it with `#[path = "support/etcd.rs"] mod etcd;`.
//!
//! Tests never skip when etcd is missing: they fail and say how to install it.
#![allow(dead_code)] // each test binary uses a different part

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's `etcd-server` package puts the binary.
pub const BINARY: &str = "/usr/bin/etcd";
/// How long etcd may take to answer `/health` after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with fresh ports, in case another process took a port between probe and bind.
const ATTEMPTS: usize = 5;

/// Whether etcd is installed.
pub fn available() -> bool {
    Path::new(BINARY).is_file()
}

/// A running single-member etcd.
pub struct Etcd {
    /// Client URL, for example `http://127.0.0.1:41234`.
    pub endpoint: String,
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers; panics (with etcd's log) if it cannot.
    pub fn start() -> Etcd {
        assert!(
            available(),
            "{BINARY} not found: these tests need a real etcd; run scripts/test, which installs \
             Debian's etcd-server (or: apt-get install etcd-server)"
        );
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let [client_port, peer_port] = free_ports();
            let mut etcd = Etcd {
                endpoint: String::new(),
                child: None,
                dir: unique_dir(),
                client_port,
                peer_port,
            };
            match etcd.launch() {
                Ok(()) => return etcd,
                Err(e) => failures.push(e),
            }
        }
        panic!("could not start etcd:\n{}", failures.join("\n---\n"));
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Kills etcd (SIGKILL) but keeps its data, to test what clients do while it is down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped etcd again on the same data, serving clients on `client_port` (a
    /// different port hides it from clients of the old endpoint) or on the old port.
    pub fn restart(&mut self, client_port: Option<u16>) {
        self.stop();
        if let Some(port) = client_port {
            self.client_port = port;
        }
        if let Err(e) = self.launch() {
            panic!("could not restart etcd: {e}");
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        self.endpoint = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let log_path = self.dir.join("etcd.log");
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(BINARY)
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.endpoint))
            .arg(format!("--advertise-client-urls={}", self.endpoint))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .args(["--logger=zap", "--log-level=error"])
            // Short raft timings: a quicker first election, and a minimum lease TTL of 1 s.
            .args(["--heartbeat-interval=50", "--election-timeout=500"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {BINARY}: {e}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited ({status}):\n{}", read_log(&log_path)));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "etcd did not become healthy within {START_TIMEOUT:?}:\n{}",
                    read_log(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asks `/health` over plain HTTP/1.0; true once etcd has a leader and serves requests.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

/// Two distinct free ports: both listeners are held until both ports are known.
fn free_ports() -> [u16; 2] {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("listener address").port();
    [port(&a), port(&b)]
}

/// A free loopback port (for [`Etcd::restart`] on another port).
pub fn free_port() -> u16 {
    free_ports()[0]
}

fn unique_dir() -> PathBuf {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "trellis-etcd-{}-{}-{nanos}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}
