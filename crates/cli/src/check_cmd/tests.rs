use super::*;
use trellis_control::check::ProxyCertificate;
use trellis_control::store::EndpointHealth;

fn proxy(node: &str, acked: &str, nack: Option<&str>) -> ProxyStatus {
    let mut v = serde_json::json!({
        "node": node, "namespace": "default", "service": "catalog", "upstreams": [],
        "allServices": false, "proxyVersion": "0.1.0", "peer": "", "connectedAt": "",
        "ackedVersion": acked, "resources": 3, "pending": false,
    });
    if let Some(e) = nack {
        v["nack"] = e.into();
        v["nackVersion"] = "9".into();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn proxies_pass_only_in_sync_and_without_nacks() {
    let cases: Vec<(&str, Vec<ProxyStatus>, Status, &str)> = vec![
        ("none", vec![], Status::Warn, "no proxy is connected"),
        (
            "in sync",
            vec![proxy("a", "9", None), proxy("b", "9", None)],
            Status::Pass,
            "2 proxies at revision 9, no NACK",
        ),
        (
            "a NACK names the proxy, revision and error",
            vec![
                proxy("a", "9", None),
                proxy("edge-1", "8", Some("Service billing has no port 8080")),
            ],
            Status::Fail,
            "1 of 2 refused their config (NACK): edge-1 refused revision 9: Service billing has no port 8080",
        ),
        (
            "behind",
            vec![proxy("a", "7", None)],
            Status::Fail,
            "1 of 1 stale: a at revision 7, current 9",
        ),
        (
            "never acknowledged",
            vec![proxy("a", "", None)],
            Status::Fail,
            "a nothing acknowledged yet",
        ),
    ];
    for (name, list, status, detail) in cases {
        let l = proxies(&list, 9);
        assert_eq!(l.status, status, "{name}: {l:?}");
        assert!(l.detail.contains(detail), "{name}: {}", l.detail);
        assert_eq!(l.hint.is_empty(), status == Status::Pass, "{name}");
    }
    assert!(
        proxies(&[proxy("e", "8", Some("x"))], 9)
            .hint
            .contains("fix what its error names")
    );
}

#[test]
fn clock_skew_allows_half_the_round_trip() {
    let max = Duration::from_secs(1);
    // (server, sent, received) → status, detail
    for (server, sent, received, want, detail) in [
        (10_050, 10_000, 10_100, Status::Pass, "0 ms ahead of"),
        (
            12_000,
            10_000,
            10_100,
            Status::Fail,
            "1950 ms ahead of this machine (± 50 ms): more than 1000 ms",
        ),
        (8_000, 10_000, 10_100, Status::Fail, "2050 ms behind"),
        // A slow answer widens the uncertainty: 1.5 s off with ± 1 s is within bounds.
        (13_500, 10_000, 14_000, Status::Pass, "1500 ms ahead"),
        (11_000, 10_000, 10_000, Status::Pass, "1000 ms ahead"),
    ] {
        let l = skew(server, sent, received, max);
        assert_eq!(l.status, want, "{l:?}");
        assert!(l.detail.contains(detail), "{}", l.detail);
    }
}

#[test]
fn the_ca_warns_before_it_expires() {
    let ca_at = |at: Option<i64>, error: &str| CaHealth {
        trust_domain: "trellis.local".into(),
        not_after_unix: at,
        roots: vec!["ab".into()],
        error: error.into(),
    };
    let day = 86_400;
    let warn = Duration::from_secs(30 * day as u64);
    let now = 1_000_000_000;
    for (c, want, detail) in [
        (ca_at(Some(now + 365 * day), ""), Status::Pass, "in 365d 0h"),
        (ca_at(Some(now + 10 * day), ""), Status::Warn, "in 10d 0h"),
        (ca_at(Some(now - 60), ""), Status::Fail, "in -60s"),
        (
            ca_at(None, "the certificate authority is not ready"),
            Status::Fail,
            "not ready",
        ),
    ] {
        let l = ca(&c, now, warn);
        assert_eq!(l.status, want, "{l:?}");
        assert!(l.detail.contains(detail), "{}", l.detail);
    }
}

#[test]
fn certificates_fail_when_renewal_is_overdue() {
    let now = 1_000_000;
    let c = |lefts: &[i64]| Certificates {
        ttl_seconds: 24 * 3600,
        proxies: lefts
            .iter()
            .enumerate()
            .map(|(i, l)| ProxyCertificate {
                node: format!("n{i}"),
                identity: "spiffe://td/ns/default/sa/x".into(),
                not_after_unix: now + l,
            })
            .collect(),
    };
    assert_eq!(certificates(&c(&[]), now).status, Status::Pass);
    let l = certificates(&c(&[20 * 3600, 9 * 3600]), now);
    assert_eq!(l.status, Status::Pass, "{l:?}");
    assert!(
        l.detail.contains("the soonest expires in 9h 0m (n1)"),
        "{}",
        l.detail
    );
    let l = certificates(&c(&[20 * 3600, 5 * 3600, -10]), now);
    assert_eq!(l.status, Status::Fail, "{l:?}");
    assert!(
        l.detail.starts_with("2 close to expiry: n1"),
        "{}",
        l.detail
    );
    assert!(
        l.detail
            .contains("n2 (spiffe://td/ns/default/sa/x) expires in -10s"),
        "{}",
        l.detail
    );
}

#[test]
fn the_store_and_its_endpoints() {
    let ep = |e: &str, healthy: bool, leader: bool| EndpointHealth {
        endpoint: e.into(),
        healthy,
        error: if healthy {
            String::new()
        } else {
            "connection refused".into()
        },
        leader,
    };
    let s = |kind: &str, reachable: bool, endpoints| StoreHealth {
        kind: kind.into(),
        reachable,
        error: if reachable {
            String::new()
        } else {
            "etcd read: timed out".into()
        },
        endpoints,
    };
    let l = store(&s("redb", true, vec![]));
    assert_eq!(
        (l.status, l.detail.as_str()),
        (Status::Pass, "redb: reads go through")
    );
    let l = store(&s(
        "etcd",
        true,
        vec![ep("http://a", true, true), ep("http://b", true, false)],
    ));
    assert_eq!(l.status, Status::Pass);
    assert!(
        l.detail
            .contains("2 of 2 endpoints healthy, leader http://a"),
        "{}",
        l.detail
    );
    let l = store(&s(
        "etcd",
        true,
        vec![ep("http://a", true, true), ep("http://b", false, false)],
    ));
    assert_eq!(l.status, Status::Warn);
    assert!(
        l.detail.contains("down: http://b (connection refused)"),
        "{}",
        l.detail
    );
    let l = store(&s("etcd", false, vec![]));
    assert_eq!(l.status, Status::Fail);
    assert!(l.hint.contains("etcd members"), "{}", l.hint);
}

#[test]
fn bundles_agree_across_replicas() {
    let r =
        |u: &str, roots: &[&str]| (u.to_string(), roots.iter().map(|s| s.to_string()).collect());
    let l = bundles(&[r("https://a", &["x"])]);
    assert_eq!(l.status, Status::Pass);
    assert!(l.detail.contains("one replica listed"), "{}", l.detail);
    let l = bundles(&[r("https://a", &["x", "y"]), r("https://b", &["x", "y"])]);
    assert_eq!(
        (l.status, l.detail.as_str()),
        (Status::Pass, "2 replicas serve the same 2 root(s)")
    );
    let l = bundles(&[
        r("https://a", &["x"]),
        r("https://b", &["x"]),
        r("https://c", &["y"]),
    ]);
    assert_eq!(l.status, Status::Fail);
    assert!(
        l.detail
            .starts_with("https://c serve(s) a different bundle"),
        "{}",
        l.detail
    );
}

#[test]
fn versions_and_durations() {
    assert_eq!(version("u", "0.1.0", "0.1.0").status, Status::Pass);
    assert_eq!(version("u", "0.2.0", "0.1.0").status, Status::Warn);
    for (s, want) in [
        (5, "5s"),
        (600, "10m"),
        (9 * 3600 + 60, "9h 1m"),
        (3 * 86_400 + 7200, "3d 2h"),
        (-30, "-30s"),
    ] {
        assert_eq!(human(s), want);
    }
}
