//! Who sent a request and who answered it: the identity labels every request, response and
//! latency series carries (and forwarded TCP connections too). One pure function,
//! [`parties`], over this proxy's own workload and what the hop knows of the other side.

use prometheus_client::encoding::EncodeLabelSet;
use std::sync::Arc;
use trellis_api::{Located, Resource};

/// This proxy's own workload, as the other side of every hop sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The service its inbound listeners serve; empty for a client-only proxy.
    pub service: Arc<str>,
    /// The `Proxy` resource's namespace.
    pub namespace: Arc<str>,
    /// Its SPIFFE id; empty without a certificate.
    pub identity: Arc<str>,
}

/// What a hop knows of the other party.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop<'a> {
    /// A request or connection from a client to this proxy's application.
    Inbound {
        /// The caller's SPIFFE id, when it came over mutual TLS.
        peer: Option<&'a str>,
    },
    /// A request or connection from the application to a backend.
    Outbound {
        /// The backend, `namespace/name:port` (empty when none was chosen).
        backend: &'a str,
        /// The identity the endpoint proved over mutual TLS (`None`: plaintext, or no
        /// endpoint answered).
        verified: Option<&'a str>,
    },
}

impl<'a> Hop<'a> {
    /// The other party's identity: what, besides this proxy's workload and the series'
    /// route and backend, tells one set of labels from another.
    pub fn identity(&self) -> Option<&'a str> {
        match *self {
            Hop::Inbound { peer } => peer,
            Hop::Outbound { verified, .. } => verified,
        }
    }
}

/// The identity labels.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Parties {
    /// The sender's service.
    pub src_service: Arc<str>,
    /// The sender's namespace.
    pub src_namespace: Arc<str>,
    /// The sender's SPIFFE id.
    pub src_identity: Arc<str>,
    /// The answering service.
    pub dst_service: Arc<str>,
    /// The answering service's namespace.
    pub dst_namespace: Arc<str>,
    /// The answering workload's SPIFFE id.
    pub dst_identity: Arc<str>,
    /// Whether the hop is mutual TLS.
    pub tls: bool,
}

/// The identity labels of a hop: outbound, this workload sent it and the backend's service
/// answered as the identity its endpoint proved; inbound, the mutual TLS caller (namespace
/// and service from its SPIFFE id: a workload's service account is its service) sent it and
/// this workload answered.
pub fn parties(own: &Workload, hop: Hop<'_>) -> Parties {
    match hop {
        Hop::Inbound { peer } => {
            let (service, namespace) = peer.and_then(spiffe_parts).unwrap_or_default();
            Parties {
                src_service: service.into(),
                src_namespace: namespace.into(),
                src_identity: peer.unwrap_or_default().into(),
                dst_service: own.service.clone(),
                dst_namespace: own.namespace.clone(),
                dst_identity: own.identity.clone(),
                tls: peer.is_some(),
            }
        }
        Hop::Outbound { backend, verified } => {
            let (service, namespace) = backend_parts(backend).unwrap_or_default();
            Parties {
                src_service: own.service.clone(),
                src_namespace: own.namespace.clone(),
                src_identity: own.identity.clone(),
                dst_service: service.into(),
                dst_namespace: namespace.into(),
                dst_identity: verified.unwrap_or_default().into(),
                tls: verified.is_some(),
            }
        }
    }
}

/// Service and namespace of `spiffe://TD/ns/NS/sa/SA`.
fn spiffe_parts(id: &str) -> Option<(&str, &str)> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let rest = path.strip_prefix("ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((sa, ns))
}

/// Service and namespace of a backend `namespace/name:port`.
fn backend_parts(backend: &str) -> Option<(&str, &str)> {
    let (ns, rest) = backend.split_once('/')?;
    let name = rest.rsplit_once(':').map_or(rest, |(n, _)| n);
    Some((name, ns))
}

/// This proxy's workload from its config (the `Proxy` resource's namespace, the service of
/// its first inbound listener that names one) and its certificate's SPIFFE id.
pub fn workload<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
    identity: Option<&str>,
) -> Workload {
    let proxy = resources.into_iter().find_map(|r| match r {
        Resource::Proxy(p) => Some(p),
        _ => None,
    });
    Workload {
        service: proxy
            .and_then(|p| p.spec.inbound.iter().find_map(|l| l.service.as_deref()))
            .unwrap_or_default()
            .into(),
        namespace: proxy.map_or("", |p| p.metadata.namespace.as_str()).into(),
        identity: identity.unwrap_or_default().into(),
    }
}

/// The workload of located resources (tests and callers that hold them).
pub fn workload_of(resources: &[Located<Resource>], identity: Option<&str>) -> Workload {
    workload(resources.iter().map(|r| &r.value), identity)
}

impl crate::Shared {
    /// Tells the metrics this proxy's workload and its endpoints' identities, after a new
    /// snapshot or certificate.
    pub fn refresh_parties(&self) {
        let snap = self.snapshot();
        let identity = self
            .mesh
            .load()
            .as_ref()
            .map(|m| m.creds.identity().to_string());
        let own = workload(&snap.resources, identity.as_deref());
        let ids = snap.endpoints.keys().filter_map(|(_, id)| id.clone());
        self.metrics.set_parties(own, ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "spiffe://mesh.test/ns/shop/sa/orders";
    const PAYMENT: &str = "spiffe://mesh.test/ns/billing/sa/payment";

    fn own(identity: &str) -> Workload {
        Workload {
            service: "orders".into(),
            namespace: "shop".into(),
            identity: identity.into(),
        }
    }

    /// (own identity, hop) → (src service, src ns, src id, dst service, dst ns, dst id, tls)
    type Case<'a> = (&'a str, Hop<'a>, [&'a str; 6], bool);

    #[test]
    fn parties_of_each_hop() {
        let cases: &[Case] = &[
            // Outbound over mutual TLS: the backend's service, the proved identity.
            (
                ORDERS,
                Hop::Outbound {
                    backend: "billing/payment:8080",
                    verified: Some(PAYMENT),
                },
                ["orders", "shop", ORDERS, "payment", "billing", PAYMENT],
                true,
            ),
            // Outbound plaintext, from a proxy without a certificate.
            (
                "",
                Hop::Outbound {
                    backend: "billing/payment:8080",
                    verified: None,
                },
                ["orders", "shop", "", "payment", "billing", ""],
                false,
            ),
            // No backend chosen (no route matched).
            (
                ORDERS,
                Hop::Outbound {
                    backend: "",
                    verified: None,
                },
                ["orders", "shop", ORDERS, "", "", ""],
                false,
            ),
            // Inbound over mutual TLS: the caller from its SPIFFE id.
            (
                ORDERS,
                Hop::Inbound {
                    peer: Some(PAYMENT),
                },
                ["payment", "billing", PAYMENT, "orders", "shop", ORDERS],
                true,
            ),
            // Inbound plaintext: nothing known of the caller.
            (
                ORDERS,
                Hop::Inbound { peer: None },
                ["", "", "", "orders", "shop", ORDERS],
                false,
            ),
            // A peer id of another shape keeps its identity, without service or namespace.
            (
                ORDERS,
                Hop::Inbound {
                    peer: Some("spiffe://mesh.test/custom/x"),
                },
                [
                    "",
                    "",
                    "spiffe://mesh.test/custom/x",
                    "orders",
                    "shop",
                    ORDERS,
                ],
                true,
            ),
        ];
        for (identity, hop, want, tls) in cases {
            let p = parties(&own(identity), *hop);
            let got = [
                &*p.src_service,
                &*p.src_namespace,
                &*p.src_identity,
                &*p.dst_service,
                &*p.dst_namespace,
                &*p.dst_identity,
            ];
            assert_eq!(got, *want, "{hop:?}");
            assert_eq!(p.tls, *tls, "{hop:?}");
        }
    }

    #[test]
    fn workload_from_config() {
        let yaml = "kind: Proxy\napiVersion: trellis.dev/v1alpha1\nmetadata: {name: p, namespace: shop}\nspec:\n  inbound:\n    - {name: a, address: '127.0.0.1:0', forwardTo: '127.0.0.1:1'}\n    - {name: b, address: '127.0.0.1:0', forwardTo: '127.0.0.1:2', service: orders}\n";
        let resources = trellis_api::parse_documents("t.yaml", yaml).unwrap();
        let w = workload_of(&resources, Some(ORDERS));
        assert_eq!(w, own(ORDERS));
        let client_only = "kind: Proxy\napiVersion: trellis.dev/v1alpha1\nmetadata: {name: p, namespace: shop}\nspec: {}\n";
        let resources = trellis_api::parse_documents("t.yaml", client_only).unwrap();
        let w = workload_of(&resources, None);
        assert_eq!(&*w.service, "");
        assert_eq!(&*w.namespace, "shop");
        assert_eq!(&*w.identity, "");
    }
}
