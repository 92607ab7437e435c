//! The web dashboard: its files and headers, read-only tokens through the real CLI, and the
//! whole dashboard in real browsers (Debian's chromium and firefox-esr, driven by
//! puppeteer-core, see tests/browser/) against a live `trellis demo`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `trellis` with a token (not the admin token) against `cp`.
fn cli_as(cp: &ControlPlane, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = trellis()
        .args(args)
        .env("TRELLIS_CONTROL", cp.url())
        .env("TRELLIS_CA_FILE", cp.ca())
        .env("TRELLIS_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn read_only_tokens_read_everything_but_change_nothing() {
    let dir = TempDir::new("dash-readonly");
    let cp = ControlPlane::start_in(dir.path());
    let canary = repo().join("demo/canary.yaml");
    let canary = canary.to_str().unwrap();

    let (code, out, err) = cp.cli(&["token", "create", "--read-only", "--ttl", "10m"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("read-only token"), "{err}");
    let reader = out.trim().to_string();
    assert!(!reader.is_empty());

    // Reads work, like the admin token's.
    let (code, _, err) = cli_as(&cp, &reader, &["get", "services"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli_as(&cp, &reader, &["stat", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("windowSeconds"), "{out}");

    // Writes and token management are refused, saying why.
    let (code, _, err) = cli_as(&cp, &reader, &["apply", "-f", canary]);
    assert_ne!(code, 0, "a read-only token applied config");
    assert!(err.contains("403") || err.contains("read-only"), "{err}");
    assert!(err.contains("admin token"), "{err}");
    let (code, _, err) = cli_as(&cp, &reader, &["token", "create", "--read-only"]);
    assert_ne!(code, 0, "a read-only token minted another token");
    assert!(err.contains("read-only"), "{err}");
    let (code, _, _) = cli_as(&cp, &reader, &["token", "create", "--service", "x"]);
    assert_ne!(code, 0, "a read-only token minted a join token");
    // The admin token still writes.
    let (code, _, err) = cp.cli(&["apply", "-f", canary]);
    assert_eq!(code, 0, "{err}");

    // A wrong token is refused outright.
    let (code, _, err) = cli_as(&cp, "not-a-token", &["get", "services"]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong admin token"), "{err}");

    // Tokens outlive nothing: a zero or over-long lifetime is refused.
    let (code, _, err) = cp.cli(&["token", "create", "--read-only", "--ttl", "400d"]);
    assert_ne!(code, 0);
    assert!(err.contains("ttl"), "{err}");
}

#[test]
fn the_dashboard_is_served_with_a_strict_content_security_policy() {
    let dir = TempDir::new("dash-files");
    let cp = ControlPlane::start_in(dir.path());
    let page = cp.https("GET", "/ui/", "").unwrap();
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body
            .contains("<script type=\"module\" src=\"app.js\">")
    );
    let csp = &page.headers["content-security-policy"];
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let js = cp.https("GET", "/ui/views.js", "").unwrap();
    assert_eq!(js.status, 200);
    assert!(js.headers["content-type"].starts_with("text/javascript"));
    assert_eq!(cp.https("GET", "/ui/nothing.js", "").unwrap().status, 404);
    // The files hold no data; the API behind them still wants a token.
    assert_eq!(cp.https("GET", "/v1/stats", "").unwrap().status, 401);
    assert_eq!(cp.https("GET", "/v1/certificates", "").unwrap().status, 401);
    let root = cp.https("GET", "/", "").unwrap();
    assert_eq!(root.status, 303, "{root:?}");
    assert_eq!(root.headers["location"], "/ui/");
}

/// The browsers the test drives, each a Debian package.
#[derive(Clone, Copy)]
enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    fn name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    /// The environment variable naming its executable, and the Debian package's default.
    fn executable(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Browser::Chromium => ("CHROMIUM", "/usr/bin/chromium", "chromium"),
            Browser::Firefox => ("FIREFOX", "/usr/bin/firefox-esr", "firefox-esr"),
        }
    }
}

/// What the browser test needs: node, the browser and `npm ci` done in tests/browser.
fn browser_tools(browser: Browser) -> Result<(PathBuf, PathBuf), String> {
    let (var, default, package) = browser.executable();
    let exe = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if !exe.exists() {
        return Err(format!(
            "{} not found (apt-get install {package})",
            exe.display()
        ));
    }
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok {
        return Err("node not found (apt-get install nodejs npm)".into());
    }
    let dir = repo().join("tests/browser");
    if !dir.join("node_modules/puppeteer-core").exists() {
        return Err(format!(
            "puppeteer-core not installed (cd {} && npm ci)",
            dir.display()
        ));
    }
    Ok((exe, dir))
}

/// `trellis demo` on a free port; returns it and its control plane URL once it printed its
/// banner.
fn start_demo(dir: &TempDir) -> (Proc, String) {
    let mut cmd = trellis();
    cmd.args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "20",
        "--data-dir",
    ])
    .arg(dir.path().join("data"));
    let proc = Proc::spawn("demo", dir.path(), cmd);
    let banner = wait_for(Duration::from_secs(90), "the demo's banner", || {
        let text = proc.log_text();
        text.contains("Ctrl-C stops everything").then_some(text)
    });
    let dashboard = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("dashboard"))
        .unwrap_or_else(|| panic!("the banner names the dashboard: {banner}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = dashboard
        .strip_suffix("/ui/")
        .unwrap_or_else(|| panic!("dashboard address {dashboard}"))
        .to_string();
    (proc, url)
}

#[test]
fn the_dashboard_works_in_a_real_browser_chromium_against_the_demo() {
    dashboard_in(Browser::Chromium);
}

#[test]
fn the_dashboard_works_in_a_real_browser_firefox_against_the_demo() {
    dashboard_in(Browser::Firefox);
}

fn dashboard_in(browser: Browser) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let (exe, browser_dir) = match browser_tools(browser) {
        Ok(t) => t,
        Err(why) if !ci => {
            eprintln!("SKIPPED the browser test: {why}; CI=true makes this a failure");
            return;
        }
        Err(why) => panic!("the browser test cannot run under CI: {why}"),
    };
    let dir = TempDir::new(&format!("dash-{}", browser.name()));
    let (_demo, url) = start_demo(&dir);
    // target/debug/trellis → target/browser-artifacts/BROWSER
    let artifacts = Path::new(bin())
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("browser-artifacts")
        .join(browser.name());
    let _ = std::fs::remove_dir_all(&artifacts);
    let log = dir.path().join("browser.log");
    let mut child = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(&url)
        .arg(dir.path().join("data/admin-token"))
        .arg(&artifacts)
        .arg(repo().join("demo/canary.yaml"))
        .env("BROWSER", browser.name())
        .env(browser.executable().0, &exe)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("browser.err")).unwrap())
        .spawn()
        .unwrap();
    // The script bounds itself (110 s); this is the backstop.
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let err = std::fs::read_to_string(dir.path().join("browser.err")).unwrap_or_default();
    println!("{out}");
    if !status.is_some_and(|s| s.success()) {
        // What the demo's processes said, before the directory goes.
        for e in std::fs::read_dir(dir.path().join("data/logs"))
            .into_iter()
            .flatten()
        {
            let e = e.unwrap();
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join("\n");
            eprintln!("--- {} ---\n{tail}", e.path().display());
        }
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the browser test failed ({status:?}); screenshots in {}\n{out}\n{err}",
        artifacts.display()
    );
    for shot in [
        "02-topology",
        "03-service",
        "04-canary-split",
        "05-tap",
        "07-certificates",
        "09-narrow-topology",
    ] {
        let f = artifacts.join(format!("{shot}.png"));
        assert!(
            std::fs::metadata(&f).is_ok_and(|m| m.len() > 1000),
            "{}",
            f.display()
        );
    }
}
