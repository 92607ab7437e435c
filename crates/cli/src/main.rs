//! `trellis`: one binary for the mesh. This file parses arguments and wires components; the
//! work happens in the library crates.
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
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
    /// Run a sidecar proxy.
    Proxy {
        /// Standalone config file (YAML), watched and hot-reloaded.
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads for the data path.
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// How often the config file is checked for changes.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        watch_interval: Duration,
    },
    /// Check config files offline: exit 0 when valid, 1 with located errors when not.
    Validate {
        /// Files or directories (every `.yaml`/`.yml` inside, recursively).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
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

fn run(command: Command) -> Result<i32> {
    match command {
        Command::Validate { files } => validate(&files),
        Command::Proxy {
            config,
            threads,
            watch_interval,
        } => {
            // One thread: the current-thread scheduler, with no cross-thread work stealing.
            let mut builder = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(threads);
                b
            };
            let rt = builder
                .thread_name("trellis-proxy")
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(proxy(config, watch_interval))
        }
    }
}

/// Reads every YAML file under `paths`, in a stable order.
fn read_files(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
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

fn validate(paths: &[PathBuf]) -> Result<i32> {
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
        Ok(0)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s) found", problems.len());
        Ok(1)
    }
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
