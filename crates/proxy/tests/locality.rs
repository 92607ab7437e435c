//! Locality-aware balancing and fallback over real upstreams on loopback: traffic stays in
//! the caller's zone, fails over to another zone when every local endpoint is down, returns
//! when they recover; a fallback service takes requests only while the primary has no usable
//! endpoint.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;

/// A Service whose endpoints carry a zone each.
fn zoned_service(name: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(a, z)| format!("{{address: \"{a}\", zone: {z}}}"))
        .collect();
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: {name}}}
spec:
  ports: [{{port: 8080}}]
  endpoints: [{}]
",
        eps.join(", ")
    )
}

/// The proxy of `support::proxy_yaml`, placed in `zone` (none: no locality).
fn proxy_in(zone: Option<&str>) -> String {
    let mut y = proxy_yaml("app");
    if let Some(z) = zone {
        y.push_str(&format!("  locality: {{region: r1, zone: {z}}}\n"));
    }
    y
}

/// `n` sequential GETs; the upstream that answered each, `"error <status>"` for a failure.
async fn gets(addr: SocketAddr, n: usize) -> Vec<String> {
    let client = h1_client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let got = get_via(&client, addr, "/").await;
        out.push(if got.status == 200 {
            got.upstream()
        } else {
            format!("error {}", got.status)
        });
    }
    out
}

fn count(answers: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(a.as_str()).or_default() += 1;
    }
    m
}

async fn two_zones() -> Vec<Stoppable> {
    let mut ups = Vec::new();
    for name in ["a0", "a1", "b0", "b1"] {
        ups.push(Stoppable::start(name).await);
    }
    ups
}

fn zones_yaml(ups: &[Stoppable]) -> String {
    let eps: Vec<(SocketAddr, &str)> = ups
        .iter()
        .map(|u| (u.addr, if u.name.starts_with('a') { "a" } else { "b" }))
        .collect();
    zoned_service("app", &eps)
}

#[tokio::test]
async fn traffic_stays_in_the_callers_zone_fails_over_and_comes_back() {
    let mut ups = two_zones().await;
    let p = start_proxy(&format!("{}{}", proxy_in(Some("a")), zones_yaml(&ups))).await;
    let addr = p.addr("out").await;

    // All healthy: zone a only.
    let before = gets(addr, 200).await;
    assert!(
        before.iter().all(|u| u.starts_with('a')),
        "{:?}",
        count(&before)
    );
    assert_eq!(
        p.metric("trellis_locality_picks_total{backend=\"default/app:8080\",priority=\"zone\"}"),
        200.0
    );

    // Every zone-a server down: the first requests detect it (failure-aware re-attempts
    // usually hide even those); after the first, every GET is answered by zone b.
    for u in &mut ups[..2] {
        u.stop().await;
    }
    let during = gets(addr, 200).await;
    assert!(
        during[1..].iter().all(|u| u.starts_with('b')),
        "{:?}",
        count(&during)
    );
    assert!(
        p.metric("trellis_locality_picks_total{backend=\"default/app:8080\",priority=\"cluster\"}")
            >= 199.0
    );

    // Zone a back: its endpoints leave backoff (at most 3.2 s after their last failure)
    // and the next request there finds them answering. Traffic is back within 5 s.
    for u in &mut ups[..2] {
        u.restart().await;
    }
    let client = h1_client();
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let got = get_via(&client, addr, "/").await;
            assert_eq!(got.status, 200, "client-visible error while zone a returns");
            if got.upstream().starts_with('a') {
                return;
            }
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "no request reached zone a within 5 s of its return"
    );
    // Once back, it stays back: no stickiness to the zone that covered for it.
    let after = gets(addr, 100).await;
    let c = count(&after);
    assert!(
        after.iter().filter(|u| u.starts_with('a')).count() >= 95,
        "{c:?}"
    );
}

#[tokio::test]
async fn no_locality_means_no_preference() {
    let ups = two_zones().await;
    // The proxy has no locality: endpoints' zones change nothing.
    let p = start_proxy(&format!("{}{}", proxy_in(None), zones_yaml(&ups))).await;
    let answers = gets(p.addr("out").await, 200).await;
    let b = answers.iter().filter(|u| u.starts_with('b')).count();
    assert!((40..=160).contains(&b), "{:?}", count(&answers));
    assert_eq!(p.metric("trellis_locality_picks_total"), 0.0);

    // The proxy has one, the endpoints none: the same.
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let p = start_proxy(&format!(
        "{}{}",
        proxy_in(Some("a")),
        service_yaml("app", 8080, &addrs)
    ))
    .await;
    let answers = gets(p.addr("out").await, 200).await;
    let b = answers.iter().filter(|u| u.starts_with('b')).count();
    assert!((40..=160).contains(&b), "{:?}", count(&answers));
}

#[tokio::test]
async fn locality_can_be_disabled_per_backend() {
    let ups = two_zones().await;
    let policy = "---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: lb}
spec:
  targetRef: {name: app}
  locality: {enabled: false}
";
    let p = start_proxy(&format!(
        "{}{}{policy}",
        proxy_in(Some("a")),
        zones_yaml(&ups)
    ))
    .await;
    let answers = gets(p.addr("out").await, 200).await;
    let b = answers.iter().filter(|u| u.starts_with('b')).count();
    assert!((40..=160).contains(&b), "{:?}", count(&answers));
}

#[tokio::test]
async fn the_fallback_takes_requests_only_while_the_primary_has_no_usable_endpoint() {
    let mut primary = Stoppable::start("primary").await;
    let backup = Stoppable::start("backup").await;
    let yaml = format!(
        "{}{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: lb}}
spec:
  targetRef: {{name: app}}
  fallback: {{name: backup}}
",
        proxy_yaml("app"),
        service_yaml("app", 8080, &[primary.addr]),
        service_yaml("backup", 8080, &[backup.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let taken =
        "trellis_fallback_total{backend=\"default/app:8080\",fallback=\"default/backup:8080\"}";

    let answers = gets(addr, 50).await;
    assert!(
        answers.iter().all(|u| u == "primary"),
        "{:?}",
        count(&answers)
    );
    assert_eq!(backup.hits.load(Ordering::Relaxed), 0);
    assert_eq!(p.metric(taken), 0.0);

    // The primary's only endpoint down: requests go to the fallback, with no client-visible
    // error, also when the primary's endpoint is probed again after its backoff.
    primary.stop().await;
    let client = h1_client();
    let mut to_backup = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        let got = get_via(&client, addr, "/").await;
        assert_eq!(got.status, 200, "client-visible error with a fallback");
        assert_eq!(got.upstream(), "backup");
        to_backup += 1;
    }
    assert!(
        p.metric(taken) >= f64::from(to_backup),
        "{}",
        p.metric(taken)
    );

    // The primary back: it takes the traffic again once its backoff has passed.
    primary.restart().await;
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if get_via(&client, addr, "/").await.upstream() == "primary" {
                return;
            }
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "the primary did not get traffic back within 5 s"
    );
    let after = gets(addr, 20).await;
    assert!(after.iter().all(|u| u == "primary"), "{:?}", count(&after));
}

#[tokio::test]
async fn no_fallback_without_a_policy_naming_one() {
    let mut primary = Stoppable::start("primary").await;
    let backup = Stoppable::start("backup").await;
    let yaml = format!(
        "{}{}{}",
        proxy_yaml("app"),
        service_yaml("app", 8080, &[primary.addr]),
        service_yaml("backup", 8080, &[backup.addr]),
    );
    let p = start_proxy(&yaml).await;
    primary.stop().await;
    let got = get(p.addr("out").await, "/").await;
    assert_eq!(got.status, 502);
    assert_eq!(backup.hits.load(Ordering::Relaxed), 0);
}
