//! `sessionPersistence` on HTTPRoute and GRPCRoute rules: the Gateway API's
//! `SessionPersistence` (GEP-1619) as published in v1.6, plus `idleTimeout`, which v1.1–v1.5
//! published and Trellis still honours.

use crate::Duration;
use serde::{Deserialize, Serialize};

/// Keeps a client on one endpoint: the proxy hands out a token (a cookie or a header) naming
/// the endpoint that answered, and sends later requests carrying it to that endpoint while it
/// is usable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionPersistence {
    /// The cookie or header name; `trellis-session-` and a hash of the rule's id when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
    /// A session ends this long after it began, however busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_timeout: Option<Duration>,
    /// A session ends after this long without a request (Gateway API v1.1–v1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// `Cookie` (default) or `Header`.
    #[serde(default, rename = "type")]
    pub kind: SessionType,
    /// Cookie settings (`type: Cookie` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_config: Option<CookieConfig>,
}

/// How the session token travels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionType {
    /// A cookie the proxy sets (`Set-Cookie`) and the client sends back.
    #[default]
    Cookie,
    /// A response header the client copies into its later requests.
    Header,
}

/// Cookie settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieConfig {
    /// `Session` (default: no `Max-Age`) or `Permanent` (`Max-Age` from `absoluteTimeout`).
    #[serde(default)]
    pub lifetime_type: LifetimeType,
}

/// Whether the cookie outlives the client's session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifetimeType {
    /// No `Max-Age`: the client drops it when its session ends.
    #[default]
    Session,
    /// `Max-Age` set to what is left of `absoluteTimeout`.
    Permanent,
}

/// Longest `sessionName` (the Gateway API's limit).
const MAX_NAME: usize = 128;

/// Header names a session token may not use: they frame, route or carry the message.
const RESERVED: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "cookie",
    "set-cookie",
    "grpc-timeout",
];

impl SessionPersistence {
    /// What is wrong with it, as (field under `sessionPersistence`, message) pairs.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(name) = &self.session_name {
            if name.is_empty() || name.len() > MAX_NAME {
                out.push((
                    "sessionName".into(),
                    format!("must be 1-{MAX_NAME} characters"),
                ));
            } else if !name.bytes().all(is_token) {
                // RFC 6265 cookie names and RFC 9110 field names are both tokens.
                out.push((
                    "sessionName".into(),
                    format!("{name:?} is not a valid cookie or header name (letters, digits and !#$%&'*+-.^_`|~)"),
                ));
            } else if self.kind == SessionType::Header
                && (RESERVED.contains(&name.to_ascii_lowercase().as_str())
                    || name.to_ascii_lowercase().starts_with("x-trellis-"))
            {
                out.push((
                    "sessionName".into(),
                    format!("{name:?} is a header the proxy or HTTP itself uses"),
                ));
            }
        }
        for (field, d) in [
            ("absoluteTimeout", self.absolute_timeout),
            ("idleTimeout", self.idle_timeout),
        ] {
            if d.is_some_and(|d| d.get().is_zero()) {
                out.push((field.into(), "must be more than 0s".into()));
            }
        }
        if let Some(c) = &self.cookie_config {
            if self.kind != SessionType::Cookie {
                out.push(("cookieConfig".into(), "only with type Cookie".into()));
            } else if c.lifetime_type == LifetimeType::Permanent && self.absolute_timeout.is_none()
            {
                out.push((
                    "absoluteTimeout".into(),
                    "required when cookieConfig.lifetimeType is Permanent (it sets Max-Age)".into(),
                ));
            }
        }
        out
    }

    /// Whether the cookie carries `Max-Age`.
    pub fn permanent(&self) -> bool {
        self.kind == SessionType::Cookie
            && self
                .cookie_config
                .as_ref()
                .is_some_and(|c| c.lifetime_type == LifetimeType::Permanent)
    }
}

/// An RFC 9110 `tchar`.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> SessionPersistence {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn problems_follow_the_spec() {
        let cases: &[(&str, &[&str])] = &[
            ("{}", &[]),
            (
                "{sessionName: JSESSIONID, absoluteTimeout: 1h, idleTimeout: 10m}",
                &[],
            ),
            ("{type: Header, sessionName: x-session}", &[]),
            (
                "{absoluteTimeout: 1h, cookieConfig: {lifetimeType: Permanent}}",
                &[],
            ),
            (
                "{cookieConfig: {lifetimeType: Permanent}}",
                &["absoluteTimeout: required when cookieConfig.lifetimeType is Permanent"],
            ),
            (
                "{type: Header, cookieConfig: {lifetimeType: Session}}",
                &["cookieConfig: only with type Cookie"],
            ),
            ("{sessionName: ''}", &["sessionName: must be 1-128"]),
            (
                "{sessionName: 'a b'}",
                &["sessionName: \"a b\" is not a valid"],
            ),
            (
                "{sessionName: 'a;b'}",
                &["sessionName: \"a;b\" is not a valid"],
            ),
            (
                "{type: Header, sessionName: Cookie}",
                &["sessionName: \"Cookie\" is a header"],
            ),
            (
                "{type: Header, sessionName: x-trellis-peer-identity}",
                &["sessionName: \"x-trellis-peer-identity\" is a header"],
            ),
            // As a cookie name, `cookie` is only odd, not harmful.
            ("{sessionName: cookie}", &[]),
            (
                "{absoluteTimeout: 0s, idleTimeout: 0s}",
                &[
                    "absoluteTimeout: must be more than 0s",
                    "idleTimeout: must be more than 0s",
                ],
            ),
        ];
        for (yaml, want) in cases {
            let got: Vec<String> = parse(yaml)
                .problems()
                .into_iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect();
            assert_eq!(got.len(), want.len(), "{yaml}: {got:?}");
            for (g, w) in got.iter().zip(*want) {
                assert!(g.starts_with(w), "{yaml}: {g} does not start with {w}");
            }
        }
        let long = format!("{{sessionName: {}}}", "a".repeat(129));
        assert_eq!(parse(&long).problems().len(), 1);
    }

    /// Both route kinds take `sessionPersistence`; GRPCRoute takes `timeouts` too. Problems
    /// name the file, line and field.
    #[test]
    fn routes_are_validated_with_their_location() {
        let base = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
        let check = |kind: &str, rule: &str| {
            let text = format!(
                "{base}---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: s}}]\n  rules:\n    - backendRefs: [{{name: s, port: 80}}]\n{rule}"
            );
            crate::validate(&crate::parse_documents("t.yaml", &text).unwrap())
                .map_err(|d| d.to_string())
        };
        for kind in ["HTTPRoute", "GRPCRoute"] {
            let good = "      timeouts: {request: 2s, backendRequest: 500ms}\n      sessionPersistence: {type: Header, sessionName: x-session, idleTimeout: 5m}\n";
            assert_eq!(check(kind, good), Ok(()), "{kind}");
            let e = check(
                kind,
                "      sessionPersistence: {cookieConfig: {lifetimeType: Permanent}}\n",
            )
            .unwrap_err();
            assert!(
                e.contains("t.yaml:")
                    && e.contains("spec.rules[0].sessionPersistence.absoluteTimeout: required"),
                "{kind}: {e}"
            );
            let e = check(kind, "      timeouts: {request: 1s, backendRequest: 2s}\n").unwrap_err();
            assert!(
                e.contains(
                    "spec.rules[0].timeouts.backendRequest: must not exceed timeouts.request"
                ),
                "{kind}: {e}"
            );
        }
    }

    #[test]
    fn defaults_and_permanence() {
        let s = parse("{}");
        assert_eq!(s.kind, SessionType::Cookie);
        assert!(!s.permanent());
        assert!(
            parse("{absoluteTimeout: 1h, cookieConfig: {lifetimeType: Permanent}}").permanent()
        );
        // Fields the published API does not have are refused, by name.
        let e = serde_saphyr::from_str::<SessionPersistence>("{cookie: {name: a}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cookie"), "{e}");
    }
}
