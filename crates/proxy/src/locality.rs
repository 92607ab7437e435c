//! Locality-aware balancing: which endpoints are near the caller, and how much of the traffic
//! each priority (nearest first) takes given how much of it is healthy.
//!
//! Priorities, nearest first: 0 the caller's zone, 1 its cluster, 2 its region, 3 anywhere
//! else. A cluster is a failure and administration domain inside a region, so traffic stays in
//! the caller's cluster (its zone first) while it has healthy capacity, then moves to another
//! cluster of the region, then to another region. A field that either side leaves unset is
//! not compared; an endpoint with no locality at all is the last priority.
//!
//! Spill-over follows Envoy's priority load: a priority's health is its healthy weight over
//! its total weight times the overprovisioning factor, capped at 100%. Each priority takes its
//! health, in order, until 100% is reached; when all health together stays below 100% the
//! loads are scaled up in proportion, so the healthy capacity that exists takes all traffic.

use std::sync::Arc;

/// Number of priorities.
pub const PRIORITIES: usize = 4;

/// The `priority` label of each priority in metrics.
pub const LABELS: [&str; PRIORITIES] = ["zone", "cluster", "region", "remote"];

/// Where a proxy or an endpoint runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// Region.
    pub region: Option<Arc<str>>,
    /// Cluster.
    pub cluster: Option<Arc<str>>,
    /// Zone.
    pub zone: Option<Arc<str>>,
}

impl Locality {
    /// From the three optional names.
    pub fn new(region: Option<&str>, cluster: Option<&str>, zone: Option<&str>) -> Locality {
        Locality {
            region: region.map(Into::into),
            cluster: cluster.map(Into::into),
            zone: zone.map(Into::into),
        }
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.region.is_none() && self.cluster.is_none() && self.zone.is_none()
    }
}

/// The priority of an endpoint at `endpoint` for a caller at `caller` (0 nearest).
pub fn priority(caller: &Locality, endpoint: &Locality) -> u8 {
    if endpoint.is_empty() {
        return (PRIORITIES - 1) as u8;
    }
    let differs =
        |a: &Option<Arc<str>>, b: &Option<Arc<str>>| matches!((a, b), (Some(a), Some(b)) if a != b);
    if differs(&caller.region, &endpoint.region) {
        3
    } else if differs(&caller.cluster, &endpoint.cluster) {
        2
    } else if differs(&caller.zone, &endpoint.zone) {
        1
    } else {
        0
    }
}

/// The share of traffic (0 to 1, summing to 1) each priority takes, from each priority's
/// healthy and total weight; `None` when nothing is healthy anywhere (then locality has no
/// say, and the balancer's own ranking picks the least bad endpoint).
pub fn shares(
    healthy: [u64; PRIORITIES],
    total: [u64; PRIORITIES],
    overprovisioning: f64,
) -> Option<[f64; PRIORITIES]> {
    let mut health = [0.0; PRIORITIES];
    for p in 0..PRIORITIES {
        if total[p] > 0 {
            health[p] = (overprovisioning * healthy[p] as f64 / total[p] as f64).min(1.0);
        }
    }
    let sum: f64 = health.iter().sum();
    if sum <= 0.0 {
        return None;
    }
    let mut out = [0.0; PRIORITIES];
    if sum < 1.0 {
        // Not enough healthy capacity anywhere: each priority in proportion to its health.
        for p in 0..PRIORITIES {
            out[p] = health[p] / sum;
        }
    } else {
        let mut left = 1.0;
        for p in 0..PRIORITIES {
            out[p] = health[p].min(left);
            left -= out[p];
        }
    }
    Some(out)
}

/// The priority a uniform random `r` falls in, laying `shares` end to end. Never a priority
/// with no share.
pub fn pick(shares: &[f64; PRIORITIES], r: u64) -> usize {
    // 53 random bits: a uniform float in [0, 1).
    let x = (r >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    let mut last = 0;
    for (p, s) in shares.iter().enumerate() {
        if *s <= 0.0 {
            continue;
        }
        acc += s;
        last = p;
        if x < acc {
            return p;
        }
    }
    // Rounding left a sliver past the end: the last priority with a share.
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(region: &str, cluster: &str, zone: &str) -> Locality {
        fn o(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        Locality::new(o(region), o(cluster), o(zone))
    }

    #[test]
    fn priorities() {
        let me = loc("eu", "c1", "a");
        let cases = [
            ("same zone", loc("eu", "c1", "a"), 0),
            ("other zone, same cluster", loc("eu", "c1", "b"), 1),
            ("other cluster, same region", loc("eu", "c2", "a"), 2),
            ("other region", loc("us", "c1", "a"), 3),
            ("no locality", loc("", "", ""), 3),
            ("zone only, same", loc("", "", "a"), 0),
            ("zone only, other", loc("", "", "b"), 1),
            ("region only, same", loc("eu", "", ""), 0),
            ("no cluster, other zone", loc("eu", "", "b"), 1),
        ];
        for (name, e, want) in cases {
            assert_eq!(priority(&me, &e), want, "{name}");
        }
        // A caller knowing only its zone compares zones only.
        let zone_only = loc("", "", "a");
        assert_eq!(priority(&zone_only, &loc("eu", "c1", "a")), 0);
        assert_eq!(priority(&zone_only, &loc("eu", "c1", "b")), 1);
    }

    fn close(got: Option<[f64; PRIORITIES]>, want: Option<[f64; PRIORITIES]>) -> bool {
        match (got, want) {
            (None, None) => true,
            (Some(g), Some(w)) => g.iter().zip(w).all(|(g, w)| (g - w).abs() < 1e-9),
            _ => false,
        }
    }

    #[test]
    fn spill_over_table() {
        type Case = (&'static str, [u64; 4], [u64; 4], Option<[f64; 4]>);
        let cases: &[Case] = &[
            (
                "all healthy locally: all local",
                [3, 3, 0, 0],
                [3, 3, 0, 0],
                Some([1.0, 0.0, 0.0, 0.0]),
            ),
            (
                // 2/3 × 1.4 = 93.3% stays, 6.7% spills to the next priority.
                "1 of 3 local unhealthy: spills per the formula",
                [2, 3, 0, 0],
                [3, 3, 0, 0],
                Some([2.8 / 3.0, 1.0 - 2.8 / 3.0, 0.0, 0.0]),
            ),
            (
                // 3/4 × 1.4 > 1: overprovisioning absorbs it.
                "1 of 4 local unhealthy: still all local",
                [3, 4, 0, 0],
                [4, 4, 0, 0],
                Some([1.0, 0.0, 0.0, 0.0]),
            ),
            (
                "all local dead: all to the next priority",
                [0, 2, 0, 0],
                [3, 2, 0, 0],
                Some([0.0, 1.0, 0.0, 0.0]),
            ),
            (
                "an empty priority is skipped",
                [0, 0, 0, 2],
                [3, 0, 0, 2],
                Some([0.0, 0.0, 0.0, 1.0]),
            ),
            (
                "spill crosses several priorities",
                [1, 1, 2, 0],
                [4, 4, 2, 0],
                Some([0.35, 0.35, 0.30, 0.0]),
            ),
            (
                // 1/4 × 1.4 = 35% and 1/4 × 1.4 = 35%: 70% in all, scaled to 100%.
                "too little healthy anywhere: in proportion to health",
                [1, 1, 0, 0],
                [4, 4, 0, 0],
                Some([0.5, 0.5, 0.0, 0.0]),
            ),
            ("nothing healthy anywhere", [0, 0, 0, 0], [3, 3, 0, 0], None),
            (
                "recovered: back to all local",
                [3, 2, 0, 0],
                [3, 2, 0, 0],
                Some([1.0, 0.0, 0.0, 0.0]),
            ),
            (
                "weights, not counts",
                [10, 1, 0, 0],
                [11, 1, 0, 0],
                Some([1.0, 0.0, 0.0, 0.0]),
            ),
        ];
        for (name, healthy, total, want) in cases {
            let got = shares(*healthy, *total, 1.4);
            assert!(close(got, *want), "{name}: got {got:?}, want {want:?}");
        }
        // Factor 1: no headroom, any unhealthy weight spills.
        assert!(close(
            shares([3, 4, 0, 0], [4, 4, 0, 0], 1.0),
            Some([0.75, 0.25, 0.0, 0.0])
        ));
    }

    /// A balancer over endpoints `a0..` in zone a and `b0..` in zone b, for a caller in a.
    fn zoned(a: usize, b: usize) -> crate::balance::Balancer {
        use crate::balance::{Balancer, Member};
        use crate::endpoint::EndpointState;
        let member = |i: usize, zone: &str| Member {
            state: std::sync::Arc::new(EndpointState::new(
                format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                None,
                Default::default(),
            )),
            weight: 1,
            locality: loc("r", "", zone),
        };
        let members = (0..a)
            .map(|i| member(i, "a"))
            .chain((a..a + b).map(|i| member(i, "b")))
            .collect();
        Balancer::new(
            trellis_api::policy::Algorithm::RoundRobin,
            members,
            1.25,
            std::time::Duration::from_secs(10),
        )
        .with_locality(&loc("r", "", "a"), 1.4, |_| Default::default())
    }

    /// How many of `n` picks land on each zone.
    fn picks(b: &crate::balance::Balancer, n: usize) -> (usize, usize) {
        let a_addrs: Vec<_> = b
            .members()
            .iter()
            .filter(|m| m.locality.zone.as_deref() == Some("a"))
            .map(|m| m.state.addr)
            .collect();
        let mut in_a = 0;
        for _ in 0..n {
            let e = b.pick(None).unwrap();
            if a_addrs.contains(&e.addr) {
                in_a += 1;
            }
        }
        (in_a, n - in_a)
    }

    #[tokio::test(start_paused = true)]
    async fn a_balancer_fails_over_and_back_as_health_changes() {
        let b = zoned(3, 3);
        let now = tokio::time::Instant::now;
        // All healthy: all local.
        assert_eq!(picks(&b, 300), (300, 0));
        // One of three local endpoints failing: 2/3 × 1.4 ≈ 93% stays local.
        b.members()[0].state.failed(now());
        let (_, remote) = picks(&b, 3000);
        assert!((120..280).contains(&remote), "{remote} of 3000 spilled");
        // Every local endpoint failing: all remote.
        for m in &b.members()[..3] {
            m.state.failed(now());
        }
        assert_eq!(picks(&b, 300), (0, 300));
        // Their backoff (at most 200 ms here) passes: the local endpoints take traffic
        // again, and with a success each they are plainly healthy: all local, no stickiness.
        tokio::time::advance(std::time::Duration::from_millis(250)).await;
        let (local, _) = picks(&b, 30);
        assert!(local > 0, "no probe went back to the local zone");
        for m in &b.members()[..3] {
            m.state.succeeded();
        }
        assert_eq!(picks(&b, 300), (300, 0));
    }

    #[test]
    fn no_locality_step_without_a_caller_locality_or_distinct_priorities() {
        use crate::balance::{Balancer, Member};
        let members = |zones: &[&str]| -> Vec<Member> {
            zones
                .iter()
                .enumerate()
                .map(|(i, z)| Member {
                    state: std::sync::Arc::new(crate::endpoint::EndpointState::new(
                        format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                        None,
                        Default::default(),
                    )),
                    weight: 1,
                    locality: loc("", "", z),
                })
                .collect()
        };
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let build = |zones: &[&str], caller: Locality| {
            let c = counted.clone();
            let b = Balancer::new(
                trellis_api::policy::Algorithm::RoundRobin,
                members(zones),
                1.25,
                std::time::Duration::from_secs(10),
            )
            .with_locality(&caller, 1.4, move |_| {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Default::default()
            });
            // Round robin over both endpoints: no narrowing.
            let mut seen = std::collections::HashSet::new();
            for _ in 0..4 {
                seen.insert(b.pick(None).unwrap().addr);
            }
            seen.len()
        };
        assert_eq!(
            build(&["a", "b"], Locality::default()),
            2,
            "caller without locality"
        );
        assert_eq!(
            build(&["", ""], loc("", "", "a")),
            2,
            "endpoints without locality"
        );
        assert_eq!(build(&["b", "b"], loc("", "", "a")), 2, "one priority only");
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(
            build(&["a", "b"], loc("", "", "a")),
            1,
            "with a locality step"
        );
    }

    #[test]
    fn pick_follows_shares() {
        let s = [0.25, 0.0, 0.75, 0.0];
        assert_eq!(pick(&s, 0), 0);
        assert_eq!(pick(&s, u64::MAX / 4 - (1 << 12)), 0);
        assert_eq!(pick(&s, u64::MAX / 4 + (1 << 12)), 2);
        assert_eq!(pick(&s, u64::MAX), 2);
        assert_eq!(pick(&[1.0, 0.0, 0.0, 0.0], u64::MAX), 0);
        // Never a priority without a share, even past rounding.
        assert_eq!(pick(&[0.0, 0.0, 1.0 - 1e-12, 0.0], u64::MAX), 2);
        let mut counts = [0u32; PRIORITIES];
        for i in 0..10_000u64 {
            counts[pick(&[0.9, 0.1, 0.0, 0.0], crate::rand::mix(i))] += 1;
        }
        assert!((8_700..9_300).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts[2] + counts[3], 0);
    }
}
