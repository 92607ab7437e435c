//! SPIFFE ids: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// The trust domain, for example `cluster.local` or `mesh.example.com`.
    pub trust_domain: String,
    /// The namespace.
    pub namespace: String,
    /// The service account (outside Kubernetes: the service name).
    pub service_account: String,
}

/// Why a text is not a SPIFFE id Trellis issues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a workload SPIFFE id (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT): {why}"
)]
pub struct ParseError {
    /// The input.
    pub text: String,
    /// What is wrong.
    pub why: &'static str,
}

/// Checks a trust domain: lowercase letters, digits, `.`, `-` and `_` (SPIFFE ID spec §2.1).
pub fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() || td.len() > 255 {
        return Err("the trust domain must be 1 to 255 characters");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err("the trust domain may only hold lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

fn check_segment(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s == "." || s == ".." {
        return Err("path segments must not be empty, '.' or '..'");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("path segments may only hold letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

impl SpiffeId {
    /// Builds and checks an id.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, ParseError> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Parses `spiffe://TD/ns/NS/sa/SA`.
    pub fn parse(text: &str) -> Result<SpiffeId, ParseError> {
        let err = |why| ParseError {
            text: text.to_string(),
            why,
        };
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("it has no path"))?;
        check_trust_domain(td).map_err(err)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => {
                check_segment(ns).map_err(err)?;
                check_segment(sa).map_err(err)?;
                Ok(SpiffeId {
                    trust_domain: td.into(),
                    namespace: (*ns).into(),
                    service_account: (*sa).into(),
                })
            }
            _ => Err(err("the path must be /ns/NAMESPACE/sa/SERVICE-ACCOUNT")),
        }
    }

    /// The TLS server name a client uses to reach this identity: `SA.NS.trellis`, a DNS
    /// name that carries the identity to the verifier (which checks the URI SAN, not this
    /// name) and that the server can read from SNI.
    pub fn server_name(&self) -> String {
        format!("{}.{}.trellis", self.service_account, self.namespace)
    }

    /// The identity a server name stands for, in `trust_domain`.
    pub fn from_server_name(name: &str, trust_domain: &str) -> Option<SpiffeId> {
        let rest = name.strip_suffix(".trellis")?;
        let (sa, ns) = rest.split_once('.')?;
        SpiffeId::new(trust_domain, ns, sa).ok()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let ok = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/orders").unwrap();
        assert_eq!(ok.trust_domain, "mesh.local");
        assert_eq!(ok.namespace, "shop");
        assert_eq!(ok.service_account, "orders");
        assert_eq!(ok.to_string(), "spiffe://mesh.local/ns/shop/sa/orders");
        let bad: &[(&str, &str)] = &[
            ("http://mesh.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://mesh.local", "no path"),
            ("spiffe://Mesh.Local/ns/a/sa/b", "lowercase"),
            ("spiffe://mesh.local/ns/a/sa/b/c", "/ns/NAMESPACE"),
            ("spiffe://mesh.local/ns/a", "/ns/NAMESPACE"),
            ("spiffe://mesh.local/ns/../sa/b", "'..'"),
            ("spiffe://mesh.local/ns/a/sa/b c", "letters"),
            ("spiffe:///ns/a/sa/b", "1 to 255"),
        ];
        for (text, want) in bad {
            let e = SpiffeId::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn server_names_carry_the_identity() {
        let id = SpiffeId::new("mesh.local", "shop", "orders").unwrap();
        assert_eq!(id.server_name(), "orders.shop.trellis");
        assert_eq!(
            SpiffeId::from_server_name(&id.server_name(), "mesh.local"),
            Some(id)
        );
        assert_eq!(
            SpiffeId::from_server_name("orders.trellis", "mesh.local"),
            None
        );
        assert_eq!(
            SpiffeId::from_server_name("example.com", "mesh.local"),
            None
        );
    }
}
