//! Prometheus HTTP service discovery (`http_sd_configs`): the metrics endpoint of every proxy
//! connected to this replica, and the replica's own, as target groups. Pure: the handler in
//! `http.rs` passes the connected proxies and the address Prometheus reached us at.

use crate::mesh::ProxyStatus;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// One `http_sd` target group: addresses and the labels they share. `__meta_*` labels are
/// for relabeling and are dropped after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `host:port` to scrape.
    pub targets: Vec<String>,
    /// Labels of every target in the group.
    pub labels: BTreeMap<String, String>,
}

/// The address Prometheus should scrape for a proxy that reported `reported` as its admin
/// address, seen connecting from `peer`. An unspecified bind address (`0.0.0.0`, `[::]`)
/// means the proxy listens everywhere: use the address it connected from. A loopback one
/// is kept as reported (Prometheus on the same host). `None` when nothing usable was
/// reported (an older proxy).
pub fn scrape_address(reported: &str, peer: Option<IpAddr>) -> Option<String> {
    let addr: SocketAddr = reported.parse().ok()?;
    if addr.port() == 0 {
        return None;
    }
    if addr.ip().is_unspecified() {
        let ip = peer?;
        return Some(SocketAddr::new(ip, addr.port()).to_string());
    }
    Some(addr.to_string())
}

/// The target groups: one per proxy with a metrics address, then the control plane at
/// `control` (the authority Prometheus used to reach this API, so also a scrapeable one),
/// served over TLS unless `insecure`.
pub fn targets(proxies: &[ProxyStatus], control: Option<&str>, insecure: bool) -> Vec<TargetGroup> {
    let mut out: Vec<TargetGroup> = proxies
        .iter()
        .filter(|p| !p.metrics_address.is_empty())
        .map(|p| TargetGroup {
            targets: vec![p.metrics_address.clone()],
            labels: BTreeMap::from([
                ("__meta_trellis_kind".into(), "proxy".into()),
                ("__meta_trellis_scheme".into(), "http".into()),
                ("__meta_trellis_proxy_id".into(), p.node.clone()),
                ("__meta_trellis_namespace".into(), p.namespace.clone()),
                ("__meta_trellis_service".into(), p.service.clone()),
                (
                    "__meta_trellis_proxy_version".into(),
                    p.proxy_version.clone(),
                ),
            ]),
        })
        .collect();
    out.sort_by(|a, b| a.targets.cmp(&b.targets));
    if let Some(c) = control.filter(|c| !c.is_empty()) {
        out.push(TargetGroup {
            targets: vec![c.to_string()],
            labels: BTreeMap::from([
                ("__meta_trellis_kind".into(), "control".into()),
                (
                    "__meta_trellis_scheme".into(),
                    if insecure { "http" } else { "https" }.into(),
                ),
            ]),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_address_uses_the_peer_for_an_unspecified_bind() {
        let peer: Option<IpAddr> = Some("10.1.2.3".parse().unwrap());
        let cases: &[(&str, Option<IpAddr>, Option<&str>)] = &[
            ("127.0.0.1:9901", peer, Some("127.0.0.1:9901")),
            ("10.0.0.5:9901", peer, Some("10.0.0.5:9901")),
            ("0.0.0.0:9901", peer, Some("10.1.2.3:9901")),
            (
                "[::]:9901",
                Some("fd00::1".parse().unwrap()),
                Some("[fd00::1]:9901"),
            ),
            ("0.0.0.0:9901", None, None),
            ("127.0.0.1:0", peer, None),
            ("", peer, None),
            ("not an address", peer, None),
        ];
        for (reported, peer, want) in cases {
            assert_eq!(
                scrape_address(reported, *peer).as_deref(),
                *want,
                "{reported} from {peer:?}"
            );
        }
    }

    #[test]
    fn targets_list_proxies_with_an_address_then_the_control_plane() {
        let proxy = |node: &str, addr: &str, service: &str| ProxyStatus {
            node: node.into(),
            namespace: "shop".into(),
            service: service.into(),
            proxy_version: "0.1.0".into(),
            metrics_address: addr.into(),
            ..ProxyStatus::default()
        };
        let groups = targets(
            &[
                proxy("b", "127.0.0.1:9002", ""),
                proxy("old", "", "catalog"),
                proxy("a", "127.0.0.1:9001", "catalog"),
            ],
            Some("127.0.0.1:7070"),
            false,
        );
        let addrs: Vec<_> = groups.iter().map(|g| g.targets.join(",")).collect();
        assert_eq!(
            addrs,
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:7070"]
        );
        assert_eq!(groups[0].labels["__meta_trellis_proxy_id"], "a");
        assert_eq!(groups[0].labels["__meta_trellis_service"], "catalog");
        assert_eq!(groups[0].labels["__meta_trellis_namespace"], "shop");
        assert_eq!(groups[0].labels["__meta_trellis_kind"], "proxy");
        assert_eq!(groups[2].labels["__meta_trellis_kind"], "control");
        assert_eq!(groups[2].labels["__meta_trellis_scheme"], "https");
        assert_eq!(targets(&[], None, false), []);
        let plain = targets(&[], Some("127.0.0.1:7070"), true);
        assert_eq!(plain[0].labels["__meta_trellis_scheme"], "http");
    }
}
