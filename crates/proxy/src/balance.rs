//! Load balancing over one backend's endpoints.
//!
//! The choice itself is a pure function ([`choose`]) over a slice of [`Load`]s so every
//! algorithm is table-tested without sockets; [`Balancer`] gathers the live loads from each
//! endpoint's shared counters and feeds them in.

use crate::endpoint::{EndpointState, Health};
use crate::rand;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use trellis_api::policy::Algorithm;

/// What the balancer knows about one endpoint at the moment of choosing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    /// Relative weight; 0 never receives traffic.
    pub weight: u32,
    /// Requests (or connections) currently outstanding.
    pub in_flight: u64,
    /// Peak-EWMA latency estimate, seconds.
    pub ewma: f64,
    /// Its recent failures.
    pub health: Health,
    /// This request already failed on it (a re-attempt).
    pub tried: bool,
}

impl Load {
    /// A healthy, untried endpoint.
    pub fn new(weight: u32, in_flight: u64, ewma: f64) -> Load {
        Load {
            weight,
            in_flight,
            ewma,
            health: Health::default(),
            tried: false,
        }
    }

    /// How much the endpoint is to be avoided: 0 healthy; 1 failing (in backoff, or out of
    /// it, or back from an ejection, with its one probe request still outstanding); 2
    /// already tried by this request; 3 not usable (ejected by outlier detection, or
    /// failing its health check). Only the lowest rank present takes traffic, so a failing
    /// endpoint is chosen only when every other one is failing too, a re-attempt goes back
    /// to an endpoint only when no other is left, and an unusable one only when nothing
    /// else is (failing open beats refusing every request).
    pub fn rank(&self) -> u8 {
        let h = &self.health;
        if h.usable().is_err() {
            3
        } else if self.tried {
            2
        } else if h.backoff || ((h.failures > 0 || h.probing) && self.in_flight > 0) {
            1
        } else {
            0
        }
    }

    /// The failure penalty: a multiplier on cost for an endpoint in backoff, which only
    /// competes when all do; then the one with fewer failures costs less.
    fn penalty(&self) -> f64 {
        if self.health.backoff {
            1.0 + f64::from(self.health.failures)
        } else {
            1.0
        }
    }
}

/// Inputs of one decision that are not loads: randomness, the round-robin counter and the
/// request's hash key, so that [`choose`] is deterministic under test.
#[derive(Clone, Copy, Debug)]
pub struct Draw {
    /// Two independent uniform random numbers.
    pub random: [u64; 2],
    /// Round-robin position.
    pub turn: usize,
    /// Hash of the request's key, for consistent hashing.
    pub hash: Option<u64>,
}

/// A consistent-hash ring: sorted `(point, endpoint index)`.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Points per unit of weight; enough that endpoints' shares stay within a few percent.
    const POINTS_PER_WEIGHT: u64 = 128;

    /// Builds a ring where each endpoint owns points in proportion to its weight. `ids` are
    /// stable names (addresses) so that a ring rebuilt with the same endpoints is identical.
    pub fn new(ids: &[(String, u32)]) -> Ring {
        let min = ids
            .iter()
            .map(|(_, w)| *w)
            .filter(|w| *w > 0)
            .min()
            .unwrap_or(1);
        let mut points = Vec::new();
        for (i, (id, weight)) in ids.iter().enumerate() {
            let n = (u64::from(*weight) * Self::POINTS_PER_WEIGHT / u64::from(min)).min(4096);
            for p in 0..n {
                points.push((rand::hash_bytes(format!("{id}#{p}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }
}

/// Picks an endpoint index, or `None` when no endpoint can take traffic. Endpoints are
/// first narrowed to the best [`Load::rank`] present; the algorithm chooses among those.
pub fn choose(
    algorithm: Algorithm,
    loads: &[Load],
    draw: Draw,
    ring: Option<&Ring>,
    bound: f64,
) -> Option<usize> {
    let best = loads
        .iter()
        .filter(|l| l.weight > 0)
        .map(Load::rank)
        .min()?;
    let ok = |i: usize| loads[i].weight > 0 && loads[i].rank() <= best;
    let live: usize = (0..loads.len()).filter(|&i| ok(i)).count();
    let total: u64 = (0..loads.len())
        .filter(|&i| ok(i))
        .map(|i| u64::from(loads[i].weight))
        .sum();
    match algorithm {
        Algorithm::RoundRobin => Some(weighted_position(loads, draw.turn as u64, total, ok)),
        Algorithm::LeastRequest => {
            // Fewest outstanding requests per unit of weight; ties broken from a random start
            // so equal endpoints share evenly.
            let start = (draw.random[0] % loads.len() as u64) as usize;
            (0..loads.len())
                .map(|i| (start + i) % loads.len())
                .filter(|&i| ok(i))
                .min_by(|&a, &b| {
                    let cost = |i: usize| {
                        loads[i].in_flight as f64 * loads[i].penalty() / f64::from(loads[i].weight)
                    };
                    cost(a).total_cmp(&cost(b))
                })
        }
        Algorithm::PeakEwma => {
            let a = weighted_position(loads, draw.random[0], total, ok);
            if live == 1 {
                return Some(a);
            }
            let mut b = weighted_position(loads, draw.random[1], total, ok);
            if b == a {
                // Second choice must differ; step to the next eligible endpoint.
                b = (1..loads.len())
                    .map(|k| (a + k) % loads.len())
                    .find(|&i| ok(i))?;
            }
            let cost = |i: usize| {
                let l = &loads[i];
                l.ewma * (l.in_flight + 1) as f64 * l.penalty() / f64::from(l.weight)
            };
            Some(if cost(b) < cost(a) { b } else { a })
        }
        Algorithm::ConsistentHash => {
            let ring = ring.filter(|r| !r.points.is_empty());
            let (Some(ring), Some(hash)) = (ring, draw.hash) else {
                // No key on this request (or no ring): fall back to a random weighted pick.
                return Some(weighted_position(loads, draw.random[0], total, ok));
            };
            // Bounded load: an endpoint may hold at most `bound` times the average load
            // (counting this request), so a hot key spills to the next endpoint on the ring.
            // A failing endpoint's keys move to the next eligible one on the ring.
            let in_flight: u64 = loads.iter().map(|l| l.in_flight).sum::<u64>() + 1;
            let cap = (bound * in_flight as f64 / live as f64).ceil().max(1.0) as u64;
            let start = ring.points.partition_point(|(p, _)| *p < hash);
            let n = ring.points.len();
            let walk = || (0..n).map(|k| ring.points[(start + k) % n].1);
            walk()
                .find(|&i| ok(i) && loads[i].in_flight < cap)
                .or_else(|| walk().find(|&i| ok(i)))
        }
    }
}

/// Whether a session's endpoint (session persistence) takes its request: while the
/// balancer counts it healthy (rank 0: not failing, ejected, failing its health check or
/// already tried by this request) and its weight is above zero. Load does not move a
/// session: an application keeps state on the endpoint, so only a failure does.
pub fn keeps_bound(l: &Load) -> bool {
    l.weight > 0 && l.rank() == 0
}

/// The eligible endpoint owning position `pos` (mod `total`, their total weight) when their
/// weights are laid end to end.
fn weighted_position(loads: &[Load], pos: u64, total: u64, ok: impl Fn(usize) -> bool) -> usize {
    let mut pos = pos % total.max(1);
    for (i, l) in loads.iter().enumerate() {
        if !ok(i) {
            continue;
        }
        let w = u64::from(l.weight);
        if pos < w {
            return i;
        }
        pos -= w;
    }
    unreachable!("pos is below the total weight")
}

/// One endpoint as a balancer sees it.
#[derive(Debug)]
pub struct Member {
    /// Shared state (counters and connection pool), kept across snapshots.
    pub state: Arc<EndpointState>,
    /// Relative weight.
    pub weight: u32,
    /// Where it runs.
    pub locality: crate::locality::Locality,
}

/// A backend's balancer: its endpoints and algorithm, immutable except for counters.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    members: Vec<Member>,
    ring: Option<Ring>,
    bound: f64,
    decay: Duration,
    turn: AtomicUsize,
    locality: Option<LocalityStep>,
}

/// The locality step: each member's priority for this proxy (computed once, when the
/// balancer is built), the overprovisioning factor, and each priority's pick counter.
#[derive(Debug)]
struct LocalityStep {
    priority: Vec<u8>,
    overprovisioning: f64,
    picks: [prometheus_client::metrics::counter::Counter; crate::locality::PRIORITIES],
}

impl Balancer {
    /// A balancer over `members`.
    pub fn new(
        algorithm: Algorithm,
        members: Vec<Member>,
        bound: f64,
        decay: Duration,
    ) -> Balancer {
        let ring = (algorithm == Algorithm::ConsistentHash).then(|| {
            Ring::new(
                &members
                    .iter()
                    .map(|m| (m.state.addr.to_string(), m.weight))
                    .collect::<Vec<_>>(),
            )
        });
        let start = rand::below(members.len().max(1) as u64) as usize;
        Balancer {
            algorithm,
            members,
            ring,
            bound,
            decay,
            turn: AtomicUsize::new(start),
            locality: None,
        }
    }

    /// Prefers members near `caller` (see [`crate::locality`]); `picks` counts the choices
    /// per priority. No step when every usable member has the same priority (the caller or
    /// the endpoints have no locality): choices are then exactly as without it.
    pub fn with_locality(
        mut self,
        caller: &crate::locality::Locality,
        overprovisioning: f64,
        picks: impl Fn(usize) -> prometheus_client::metrics::counter::Counter,
    ) -> Balancer {
        if caller.is_empty() {
            return self;
        }
        let priority: Vec<u8> = self
            .members
            .iter()
            .map(|m| crate::locality::priority(caller, &m.locality))
            .collect();
        let mut used = priority
            .iter()
            .zip(&self.members)
            .filter(|(_, m)| m.weight > 0)
            .map(|(p, _)| *p);
        let Some(first) = used.next() else {
            return self;
        };
        if used.all(|p| p == first) {
            return self;
        }
        self.locality = Some(LocalityStep {
            priority,
            overprovisioning,
            picks: std::array::from_fn(picks),
        });
        self
    }

    /// The locality step: keeps only the members of one priority, drawn by each priority's
    /// share of healthy capacity, by zeroing the others' weights. A consistent-hash key
    /// draws the priority (mixed, so that it does not pick ring positions along with it),
    /// so a key keeps its place while the shares hold.
    fn narrow(&self, loads: &mut [Load], hash: Option<u64>) {
        let Some(step) = &self.locality else { return };
        const N: usize = crate::locality::PRIORITIES;
        let (mut healthy, mut total) = ([0u64; N], [0u64; N]);
        for (l, p) in loads.iter().zip(&step.priority) {
            let w = u64::from(l.weight);
            total[usize::from(*p)] += w;
            if l.rank() == 0 {
                healthy[usize::from(*p)] += w;
            }
        }
        let Some(shares) = crate::locality::shares(healthy, total, step.overprovisioning) else {
            // Nothing healthy anywhere: the ranks alone choose the least bad.
            return;
        };
        let chosen = crate::locality::pick(&shares, hash.map_or_else(rand::u64, rand::mix));
        step.picks[chosen].inc();
        for (l, p) in loads.iter_mut().zip(&step.priority) {
            if usize::from(*p) != chosen {
                l.weight = 0;
            }
        }
    }

    /// The endpoints.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Chooses an endpoint for a request whose hash key (if the algorithm uses one) is `hash`.
    pub fn pick(&self, hash: Option<u64>) -> Option<&Arc<EndpointState>> {
        self.pick_avoiding(hash, &[])
    }

    /// Like [`Balancer::pick`], avoiding the endpoints in `tried` (where this request already
    /// failed) while any other can take it.
    pub fn pick_avoiding(
        &self,
        hash: Option<u64>,
        tried: &[&EndpointState],
    ) -> Option<&Arc<EndpointState>> {
        // One endpoint (an inbound sidecar's app, a single-instance service): nothing to
        // compare, so no loads to gather and no clock to read.
        if let [only] = self.members.as_slice() {
            return (only.weight > 0).then_some(&only.state);
        }
        let now = tokio::time::Instant::now();
        // Small backends are the common case: keep the loads on the stack.
        let mut buf = [Load::new(0, 0, 0.0); 16];
        let mut heap;
        let loads: &mut [Load] = if self.members.len() <= buf.len() {
            &mut buf[..self.members.len()]
        } else {
            heap = vec![Load::new(0, 0, 0.0); self.members.len()];
            &mut heap
        };
        for (l, m) in loads.iter_mut().zip(&self.members) {
            *l = self.load(m, now, tried);
        }
        self.narrow(loads, hash);
        let draw = Draw {
            random: [rand::u64(), rand::u64()],
            turn: if self.algorithm == Algorithm::RoundRobin {
                self.turn.fetch_add(1, Ordering::Relaxed)
            } else {
                0
            },
            hash,
        };
        choose(self.algorithm, loads, draw, self.ring.as_ref(), self.bound)
            .map(|i| &self.members[i].state)
    }

    /// What the choice reads about member `m` at `now`.
    #[inline]
    fn load(&self, m: &Member, now: tokio::time::Instant, tried: &[&EndpointState]) -> Load {
        Load {
            weight: m.weight,
            in_flight: m.state.in_flight(),
            ewma: m.state.ewma(now, self.decay),
            health: m.state.health(now),
            tried: tried.iter().any(|t| std::ptr::eq(*t, &*m.state)),
        }
    }

    /// Every member's load at `now` as a first try reads it, for `trellis explain`.
    pub fn loads(&self, now: tokio::time::Instant) -> Vec<Load> {
        self.members
            .iter()
            .map(|m| self.load(m, now, &[]))
            .collect()
    }

    /// Like [`Balancer::pick_avoiding`], but member `bound` (a session's endpoint) first,
    /// when [`keeps_bound`] says it takes the request; before the locality step, so a
    /// session stays with its endpoint whatever priority that is.
    pub fn pick_bound(
        &self,
        bound: Option<usize>,
        hash: Option<u64>,
        tried: &[&EndpointState],
    ) -> Option<&Arc<EndpointState>> {
        if let Some(m) = bound.and_then(|i| self.members.get(i)) {
            let load = Load {
                health: m.state.health(tokio::time::Instant::now()),
                tried: tried.iter().any(|t| std::ptr::eq(*t, &*m.state)),
                ..Load::new(m.weight, m.state.in_flight(), 0.0)
            };
            if keeps_bound(&load) {
                return Some(&m.state);
            }
        }
        self.pick_avoiding(hash, tried)
    }

    /// Whether any endpoint not in `tried` can take traffic now without being avoided
    /// (weight above zero, healthy by [`Load::rank`]). False drives the fallback step.
    pub fn usable(&self, tried: &[&EndpointState]) -> bool {
        let now = tokio::time::Instant::now();
        self.members.iter().any(|m| {
            let load = Load {
                health: m.state.health(now),
                tried: tried.iter().any(|t| std::ptr::eq(*t, &*m.state)),
                ..Load::new(m.weight, m.state.in_flight(), 0.0)
            };
            m.weight > 0 && load.rank() == 0
        })
    }

    /// The EWMA decay window.
    pub fn decay(&self) -> Duration {
        self.decay
    }

    /// Whether choices use response latency, so that it is worth measuring.
    pub fn measures_latency(&self) -> bool {
        self.algorithm == Algorithm::PeakEwma && self.members.len() > 1
    }

    /// Records a response latency for an endpoint, when the algorithm uses latency.
    pub fn observe(&self, endpoint: &EndpointState, rtt: Duration, now: tokio::time::Instant) {
        if self.measures_latency() {
            endpoint.observe(rtt, now, self.decay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(weight: u32, in_flight: u64, ewma_ms: f64) -> Load {
        Load::new(weight, in_flight, ewma_ms / 1000.0)
    }

    fn draw(r0: u64, r1: u64) -> Draw {
        Draw {
            random: [r0, r1],
            turn: 0,
            hash: None,
        }
    }

    #[test]
    fn table() {
        use Algorithm::*;
        type Case = (&'static str, Algorithm, Vec<Load>, Draw, Option<usize>);
        let cases: &[Case] = &[
            ("no endpoints", PeakEwma, vec![], draw(0, 0), None),
            (
                "all weight zero",
                RoundRobin,
                vec![l(0, 0, 1.0), l(0, 0, 1.0)],
                draw(0, 0),
                None,
            ),
            (
                "single endpoint",
                PeakEwma,
                vec![l(1, 9, 50.0)],
                draw(5, 7),
                Some(0),
            ),
            (
                "ewma prefers faster of the two",
                PeakEwma,
                vec![l(1, 0, 50.0), l(1, 0, 1.0)],
                draw(0, 1),
                Some(1),
            ),
            (
                "ewma same draw order",
                PeakEwma,
                vec![l(1, 0, 50.0), l(1, 0, 1.0)],
                draw(1, 0),
                Some(1),
            ),
            (
                "ewma counts in-flight",
                PeakEwma,
                vec![l(1, 10, 1.0), l(1, 0, 5.0)],
                draw(0, 1),
                Some(1),
            ),
            (
                "ewma skips zero weight",
                PeakEwma,
                vec![l(0, 0, 0.1), l(1, 0, 9.0), l(1, 0, 10.0)],
                draw(0, 0),
                Some(1),
            ),
            (
                "rr turn 0",
                RoundRobin,
                vec![l(1, 0, 1.0), l(1, 0, 1.0)],
                Draw {
                    turn: 0,
                    ..draw(0, 0)
                },
                Some(0),
            ),
            (
                "rr turn 1",
                RoundRobin,
                vec![l(1, 0, 1.0), l(1, 0, 1.0)],
                Draw {
                    turn: 1,
                    ..draw(0, 0)
                },
                Some(1),
            ),
            (
                "rr weighted",
                RoundRobin,
                vec![l(3, 0, 1.0), l(1, 0, 1.0)],
                Draw {
                    turn: 2,
                    ..draw(0, 0)
                },
                Some(0),
            ),
            (
                "rr weighted last",
                RoundRobin,
                vec![l(3, 0, 1.0), l(1, 0, 1.0)],
                Draw {
                    turn: 3,
                    ..draw(0, 0)
                },
                Some(1),
            ),
            (
                "least request",
                LeastRequest,
                vec![l(1, 5, 1.0), l(1, 2, 1.0), l(1, 3, 1.0)],
                draw(0, 0),
                Some(1),
            ),
            (
                "least request per weight",
                LeastRequest,
                vec![l(4, 4, 1.0), l(1, 2, 1.0)],
                draw(0, 0),
                Some(0),
            ),
            (
                "hash without key falls back",
                ConsistentHash,
                vec![l(1, 0, 1.0)],
                draw(0, 0),
                Some(0),
            ),
        ];
        for (name, algo, loads, d, want) in cases {
            assert_eq!(choose(*algo, loads, *d, None, 1.25), *want, "{name}");
        }
    }

    /// An endpoint in backoff after `failures` failures.
    fn backed_off(mut l: Load, failures: u32) -> Load {
        l.health = Health {
            failures,
            backoff: true,
            ..Default::default()
        };
        l
    }

    fn tried(mut l: Load) -> Load {
        l.tried = true;
        l
    }

    #[test]
    fn ejected_and_check_failing_endpoints_are_out_of_every_algorithm() {
        use Algorithm::*;
        let with = |health: Health| Load {
            health,
            ..l(1, 0, 0.0)
        };
        let ejected = with(Health {
            ejected: true,
            ..Default::default()
        });
        let down = with(Health {
            down: true,
            ..Default::default()
        });
        let probing = |in_flight| Load {
            in_flight,
            ..with(Health {
                probing: true,
                ..Default::default()
            })
        };
        let ring = Ring::new(&[("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]);
        let two = Ring::new(&[("a".into(), 1), ("b".into(), 1)]);
        for algo in [PeakEwma, RoundRobin, LeastRequest, ConsistentHash] {
            for out in [ejected, down] {
                // Idle and fast, yet never chosen while another endpoint is usable, even one
                // this request already failed on.
                for r in 0..12u64 {
                    let d = Draw {
                        random: [r, r + 1],
                        turn: r as usize,
                        hash: Some(r.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    };
                    let loads = [out, l(1, 5, 9.0), out];
                    assert_eq!(
                        choose(algo, &loads, d, Some(&ring), 1.25),
                        Some(1),
                        "{algo:?} {out:?}"
                    );
                    let loads = [out, tried(l(1, 5, 9.0))];
                    assert_eq!(choose(algo, &loads, d, Some(&two), 1.25), Some(1));
                }
                // Nothing else left: still answered.
                assert!(choose(algo, &[out, out], draw(0, 1), Some(&two), 1.25).is_some());
            }
            // Back from an ejection: one request at a time.
            let d = draw(0, 1);
            assert_eq!(
                choose(algo, &[probing(1), l(1, 5, 9.0)], d, None, 1.25),
                Some(1)
            );
        }
        // Idle, the probing endpoint is tried.
        assert_eq!(
            choose(
                LeastRequest,
                &[probing(0), l(1, 5, 9.0)],
                draw(0, 1),
                None,
                1.25
            ),
            Some(0)
        );
    }

    #[test]
    fn failing_and_tried_endpoints_are_avoided_by_every_algorithm() {
        use Algorithm::*;
        let dead = |ewma| backed_off(l(1, 0, ewma), 1);
        // Out of backoff with its one probe request outstanding.
        let probing = Load {
            health: Health {
                failures: 2,
                backoff: false,
                ..Default::default()
            },
            ..l(1, 1, 0.0)
        };
        let out_of_backoff = Load {
            health: Health {
                failures: 2,
                backoff: false,
                ..Default::default()
            },
            ..l(1, 0, 0.0)
        };
        type Case = (&'static str, Algorithm, Vec<Load>, Draw, Option<usize>);
        let cases: Vec<Case> = vec![
            // The dead endpoint's latency has decayed to nothing: still never chosen.
            (
                "ewma: backed-off endpoint loses though cheapest",
                PeakEwma,
                vec![dead(0.0), l(1, 3, 5.0), l(1, 3, 5.0)],
                draw(0, 1),
                Some(1),
            ),
            (
                "ewma: backed-off endpoint is no second choice",
                PeakEwma,
                vec![l(1, 3, 5.0), dead(0.0), l(1, 3, 5.0)],
                draw(0, 1),
                Some(0),
            ),
            (
                "ewma: one endpoint left",
                PeakEwma,
                vec![dead(0.0), l(1, 9, 50.0), dead(0.0)],
                draw(0, 2),
                Some(1),
            ),
            (
                "ewma: all failing, fewest failures",
                PeakEwma,
                vec![backed_off(l(1, 0, 1.0), 5), backed_off(l(1, 0, 1.0), 1)],
                draw(0, 1),
                Some(1),
            ),
            (
                "ewma: one probe at a time",
                PeakEwma,
                vec![probing, l(1, 3, 5.0), l(1, 3, 5.0)],
                draw(0, 0),
                Some(1),
            ),
            (
                "ewma: out of backoff, the endpoint is probed",
                PeakEwma,
                vec![out_of_backoff, l(1, 3, 5.0)],
                draw(0, 1),
                Some(0),
            ),
            (
                "rr: skips the backed-off endpoint",
                RoundRobin,
                vec![l(1, 0, 1.0), dead(1.0), l(1, 0, 1.0)],
                Draw {
                    turn: 1,
                    ..draw(0, 0)
                },
                Some(2),
            ),
            (
                "rr: all backed off still answers",
                RoundRobin,
                vec![dead(1.0), dead(1.0)],
                Draw {
                    turn: 1,
                    ..draw(0, 0)
                },
                Some(1),
            ),
            (
                "least request: idle but failing loses",
                LeastRequest,
                vec![dead(1.0), l(1, 7, 1.0), l(1, 4, 1.0)],
                draw(0, 0),
                Some(2),
            ),
            (
                "least request: all failing, fewest failures",
                LeastRequest,
                vec![backed_off(l(1, 1, 1.0), 4), backed_off(l(1, 1, 1.0), 1)],
                draw(0, 0),
                Some(1),
            ),
            (
                "re-attempt: never the endpoint just tried while another is there",
                PeakEwma,
                vec![tried(l(1, 0, 0.0)), l(1, 9, 90.0)],
                draw(0, 0),
                Some(1),
            ),
            (
                "re-attempt: a backed-off untried one before the tried one",
                RoundRobin,
                vec![tried(l(1, 0, 1.0)), dead(1.0)],
                Draw {
                    turn: 0,
                    ..draw(0, 0)
                },
                Some(1),
            ),
            (
                "re-attempt: the tried one when it is the only one",
                LeastRequest,
                vec![tried(l(1, 0, 1.0)), l(0, 0, 1.0)],
                draw(0, 0),
                Some(0),
            ),
        ];
        for (name, algo, loads, d, want) in &cases {
            assert_eq!(choose(*algo, loads, *d, None, 1.25), *want, "{name}");
        }
    }

    #[test]
    fn consistent_hash_moves_only_a_failing_endpoints_keys() {
        let (ring, loads) = ring_of(4);
        for key in 0..1000u64 {
            let d = Draw {
                hash: Some(rand::mix(key)),
                ..draw(0, 0)
            };
            let home = choose(Algorithm::ConsistentHash, &loads, d, Some(&ring), 1.25).unwrap();
            let mut failing = loads.clone();
            failing[2] = backed_off(failing[2], 1);
            let now = choose(Algorithm::ConsistentHash, &failing, d, Some(&ring), 1.25).unwrap();
            assert_ne!(now, 2, "key {key} went to the failing endpoint");
            if home != 2 {
                assert_eq!(home, now, "key {key} moved though its endpoint is fine");
            }
        }
    }

    fn ring_of(n: usize) -> (Ring, Vec<Load>) {
        let ids: Vec<_> = (0..n).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        (Ring::new(&ids), vec![l(1, 0, 1.0); n])
    }

    #[test]
    fn consistent_hash_is_sticky_and_spread() {
        let (ring, loads) = ring_of(4);
        let mut counts = [0u32; 4];
        for key in 0..4000u64 {
            let h = rand::mix(key);
            let d = Draw {
                hash: Some(h),
                ..draw(key, key)
            };
            let a = choose(Algorithm::ConsistentHash, &loads, d, Some(&ring), 1.25).unwrap();
            let b = choose(
                Algorithm::ConsistentHash,
                &loads,
                Draw {
                    random: [9, 9],
                    ..d
                },
                Some(&ring),
                1.25,
            )
            .unwrap();
            assert_eq!(a, b, "same key, same endpoint");
            counts[a] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven ring: {counts:?}");
        }
    }

    #[test]
    fn consistent_hash_bounded_load_spills() {
        let (ring, mut loads) = ring_of(4);
        let h = rand::mix(42);
        let d = Draw {
            hash: Some(h),
            ..draw(0, 0)
        };
        let home = choose(Algorithm::ConsistentHash, &loads, d, Some(&ring), 1.25).unwrap();
        // The key's home endpoint is at the cap: ceil(1.25 * (3 + 1 + 1 + 1 + 1) / 4) = 3.
        loads[home].in_flight = 3;
        for (i, l) in loads.iter_mut().enumerate() {
            if i != home {
                l.in_flight = 5 / 3;
            }
        }
        let spilled = choose(Algorithm::ConsistentHash, &loads, d, Some(&ring), 1.25).unwrap();
        assert_ne!(spilled, home);
        // Removing one endpoint only moves the keys it owned.
        let ids3: Vec<_> = (0..3).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        let ring3 = Ring::new(&ids3);
        let loads3 = vec![l(1, 0, 1.0); 3];
        let loads4 = vec![l(1, 0, 1.0); 4];
        for key in 0..1000u64 {
            let d = Draw {
                hash: Some(rand::mix(key)),
                ..draw(0, 0)
            };
            let before = choose(Algorithm::ConsistentHash, &loads4, d, Some(&ring), 1.25).unwrap();
            let after = choose(Algorithm::ConsistentHash, &loads3, d, Some(&ring3), 1.25).unwrap();
            if before != 3 {
                assert_eq!(before, after, "key {key} moved though its endpoint stayed");
            }
        }
    }

    #[test]
    fn a_session_keeps_its_endpoint_only_while_it_is_healthy() {
        let with = |health: Health| Load {
            health,
            ..l(1, 0, 1.0)
        };
        let cases: &[(&str, Load, bool)] = &[
            ("healthy", l(1, 0, 1.0), true),
            (
                "busy and slow: load never moves a session",
                l(1, 500, 900.0),
                true,
            ),
            ("weight 0", l(0, 0, 1.0), false),
            (
                "backed off after a failure",
                backed_off(l(1, 0, 1.0), 1),
                false,
            ),
            (
                "ejected",
                with(Health {
                    ejected: true,
                    ..Default::default()
                }),
                false,
            ),
            (
                "failing its health check",
                with(Health {
                    down: true,
                    ..Default::default()
                }),
                false,
            ),
            ("already tried by this request", tried(l(1, 0, 1.0)), false),
            (
                "out of backoff, idle: probed by the session",
                with(Health {
                    failures: 1,
                    ..Default::default()
                }),
                true,
            ),
        ];
        for (name, load, want) in cases {
            assert_eq!(keeps_bound(load), *want, "{name}");
        }
    }

    #[test]
    fn weighted_random_follows_weights() {
        let loads = vec![l(9, 0, 1.0), l(1, 0, 1.0)];
        let mut first = 0;
        for i in 0..10_000u64 {
            // With equal costs the first draw wins, so the split follows the weights.
            if choose(
                Algorithm::PeakEwma,
                &loads,
                draw(rand::mix(i), rand::mix(i + 1)),
                None,
                1.25,
            ) == Some(0)
            {
                first += 1;
            }
        }
        // Two draws: endpoint 1 wins only if both draws land on it or it is first (ties).
        assert!(first > 8_000, "{first}");
    }
}
