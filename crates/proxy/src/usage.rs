//! CPU and memory of this sidecar and of its app, for the capacity report: sampled from
//! `/proc` when a traffic report is sent (every few seconds, off the request path).
//!
//! The app is the process `trellis run` started, in its own process group: the group's
//! members are summed, and each member's reaped children too (`cutime`/`cstime`), so work
//! done by short-lived helpers is not lost. CPU times are cumulative; the control plane turns
//! two samples into a rate.

use std::sync::atomic::{AtomicU32, Ordering};
use trellis_api::wire;

/// One process's line of `/proc/PID/stat`, the fields the report needs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    /// Its process group.
    pub pgrp: i64,
    /// User + system CPU ticks of the process itself.
    pub ticks: u64,
    /// User + system CPU ticks of its reaped children.
    pub child_ticks: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) … utime(14) stime(15) cutime(16) cstime(17)
    // … rss(24), so field n is f[n - 3].
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<i64>().ok());
    let ticks = |a: usize, b: usize| Some(n(a)?.max(0) as u64 + n(b)?.max(0) as u64);
    Some(Stat {
        pgrp: n(5)?,
        ticks: ticks(14, 15)?,
        child_ticks: ticks(16, 17)?,
        rss_pages: n(24)?.max(0) as u64,
    })
}

/// The app's process, set by `trellis run` once it has started it (0: none).
#[derive(Default)]
pub struct App(AtomicU32);

impl App {
    /// The app's process id (also its process group).
    pub fn set(&self, pid: u32) {
        self.0.store(pid, Ordering::Relaxed);
    }

    fn get(&self) -> Option<u32> {
        Some(self.0.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }
}

/// Sums a process group's members (`stats` of every process), or `None` when none is left.
pub fn group(stats: impl IntoIterator<Item = Stat>, pgrp: i64) -> Option<(u64, u64, u32)> {
    let (mut ticks, mut pages, mut n) = (0u64, 0u64, 0u32);
    for s in stats.into_iter().filter(|s| s.pgrp == pgrp) {
        ticks += s.ticks + s.child_ticks;
        pages += s.rss_pages;
        n += 1;
    }
    (n > 0).then_some((ticks, pages, n))
}

fn read_stat(pid: &str) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Samples this process and the app's group. Blocking (reads `/proc`): run it off the
/// runtime's workers.
pub fn sample(app: Option<u32>) -> wire::Usage {
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let page = rustix::param::page_size() as u64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut usage = wire::Usage {
        cpu_cores: u32::try_from(cores).unwrap_or(u32::MAX),
        ..Default::default()
    };
    // Only the sidecar's own ticks: its reaped children are the app's.
    if let Some(s) = read_stat("self") {
        usage.sidecar_cpu_seconds = s.ticks as f64 / hz;
        usage.sidecar_rss_bytes = s.rss_pages * page;
    }
    let Some(pid) = app else {
        return usage;
    };
    let members = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| read_stat(name))?
        });
    if let Some((ticks, pages, n)) = group(members, i64::from(pid)) {
        usage.app_cpu_seconds = ticks as f64 / hz;
        usage.app_rss_bytes = pages * page;
        usage.app_processes = n;
    }
    usage
}

impl App {
    /// Samples this process and the app, off the runtime's workers.
    pub async fn sample(&self) -> wire::Usage {
        let app = self.get();
        tokio::task::spawn_blocking(move || sample(app))
            .await
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_from_the_last_parenthesis() {
        let line = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 3 0 12345 10000000 512 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pgrp: 4242,
                ticks: 300,
                child_ticks: 50,
                rss_pages: 512
            })
        );
        for bad in ["", "1 (x) S 1", "no parenthesis at all 1 2 3"] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_group_sums_its_members_and_their_reaped_children() {
        let s = |pgrp, ticks, child_ticks, rss_pages| Stat {
            pgrp,
            ticks,
            child_ticks,
            rss_pages,
        };
        let all = [s(7, 100, 10, 50), s(7, 20, 0, 30), s(8, 999, 0, 999)];
        assert_eq!(group(all, 7), Some((130, 80, 2)));
        assert_eq!(group(all, 9), None, "the app has exited");
    }

    #[test]
    fn this_process_uses_some_cpu_and_memory() {
        // Burn a little CPU so the tick counter moves.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let u = sample(Some(std::process::id()));
        assert!(u.sidecar_rss_bytes > 1 << 20, "{u:?}");
        assert!(u.cpu_cores >= 1);
        // The test process leads its own group only when run directly; either way the
        // sample must not invent numbers for a group without members.
        if u.app_processes == 0 {
            assert_eq!((u.app_cpu_seconds, u.app_rss_bytes), (0.0, 0));
        }
    }
}
