//! Authorization at the inbound sidecar: a pure decision over the compiled policies of the
//! local service, the caller's identity, the request and the time (passed in, so tests use
//! any clock). See `trellis_api::authz` for the semantics.

use std::sync::Arc;
use trellis_api::authz::{AuthorizationPolicySpec, AuthzAction, AuthzMode, Weekday, parse_hhmm};

/// The policies one inbound listener enforces, and its default.
#[derive(Debug, Default)]
pub struct Authz {
    policies: Vec<Policy>,
    default_action: AuthzAction,
    default_mode: AuthzMode,
    default_name: Arc<str>,
}

#[derive(Debug)]
struct Policy {
    name: Arc<str>,
    action: AuthzAction,
    mode: AuthzMode,
    rules: Vec<Rule>,
}

#[derive(Debug, Default)]
struct Rule {
    identities: Vec<String>,
    namespaces: Vec<String>,
    paths: Vec<String>,
    methods: Vec<String>,
    ports: Vec<u16>,
    headers: Vec<(http::HeaderName, Vec<String>)>,
    when: Option<Window>,
    claims: Vec<(String, Vec<String>)>,
}

#[derive(Debug)]
struct Window {
    start: u16,
    end: u16,
    tz: jiff::tz::TimeZone,
    days: Vec<Weekday>,
}

/// What is being authorized.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's SPIFFE id (mutual TLS), if any.
    pub peer: Option<&'a str>,
    /// Method, path and headers; `None` for an opaque TCP connection.
    pub http: Option<(&'a http::Method, &'a str, &'a http::HeaderMap)>,
    /// The destination (application) port.
    pub port: u16,
    /// Claims of the request's verified JSON Web Token, if any.
    pub claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request goes through.
    pub allow: bool,
    /// What decided: a policy (`namespace/name`), `default`, or `no-allow-policy-matched`.
    pub policy: Arc<str>,
    /// The rule of `policy` that decided (its index, from 0); `None` when a default or the
    /// absence of a matching Allow rule decided.
    pub rule: Option<u32>,
    /// When an audit-mode policy (or default) would have denied a request that is allowed:
    /// what would have denied it, and its rule.
    pub audit_denied_by: Option<Arc<str>>,
    /// The rule of `audit_denied_by` that would have denied.
    pub audit_rule: Option<u32>,
}

impl Verdict {
    /// How the verdict is counted: `allow`, `deny` or `audit_deny` (allowed, but an audit-mode
    /// policy would deny), and the policy and rule behind that decision.
    pub fn decision(&self) -> (&'static str, &Arc<str>, Option<u32>) {
        match (&self.audit_denied_by, self.allow) {
            (_, false) => ("deny", &self.policy, self.rule),
            (Some(a), true) => ("audit_deny", a, self.audit_rule),
            (None, true) => ("allow", &self.policy, self.rule),
        }
    }
}

impl Authz {
    /// Compiles `policies` (`(namespace/name, spec)`) with the namespace's default.
    pub fn new(
        policies: &[(String, &AuthorizationPolicySpec)],
        default_action: AuthzAction,
        default_mode: AuthzMode,
        default_name: &str,
    ) -> Result<Authz, String> {
        let mut out = Vec::new();
        for (name, spec) in policies {
            let mut rules = Vec::new();
            for r in &spec.rules {
                let mut rule = Rule::default();
                if let Some(f) = &r.from {
                    rule.identities = f.identities.clone();
                    rule.namespaces = f.namespaces.clone();
                }
                if let Some(t) = &r.to {
                    rule.paths = t.paths.clone();
                    rule.methods = t.methods.clone();
                    rule.ports = t.ports.clone();
                    for h in &t.headers {
                        let n = http::HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|e| format!("{name}: header {:?}: {e}", h.name))?;
                        rule.headers.push((n, h.values.clone()));
                    }
                }
                rule.claims = r
                    .claims
                    .iter()
                    .map(|c| (c.name.clone(), c.values.clone()))
                    .collect();
                if let Some(w) = &r.when {
                    rule.when = Some(Window {
                        start: parse_hhmm(&w.start)
                            .ok_or_else(|| format!("{name}: start {:?}", w.start))?,
                        end: parse_hhmm(&w.end)
                            .ok_or_else(|| format!("{name}: end {:?}", w.end))?,
                        tz: jiff::tz::TimeZone::get(&w.time_zone)
                            .map_err(|e| format!("{name}: time zone {:?}: {e}", w.time_zone))?,
                        days: w.days.clone(),
                    });
                }
                rules.push(rule);
            }
            out.push(Policy {
                name: name.as_str().into(),
                action: spec.action,
                mode: spec.mode,
                rules,
            });
        }
        Ok(Authz {
            policies: out,
            default_action,
            default_mode,
            default_name: default_name.into(),
        })
    }

    /// Whether anything is configured beyond allowing everything.
    pub fn is_open(&self) -> bool {
        self.policies.is_empty() && self.default_action == AuthzAction::Allow
    }

    /// Whether some rule that applies at destination `port`, in any policy and mode, looks at
    /// what only an HTTP request carries (path, method, headers, a token's claims). Such a
    /// rule cannot be evaluated on opaque TCP, so the port must refuse what is not HTTP.
    pub fn needs_layer7(&self, port: u16) -> bool {
        self.policies
            .iter()
            .flat_map(|p| &p.rules)
            .any(|r| (r.ports.is_empty() || r.ports.contains(&port)) && r.needs_layer7())
    }

    /// Decides `req` at `now`.
    pub fn decide(&self, req: &Request<'_>, now: jiff::Timestamp) -> Verdict {
        let enforced = self.eval(req, now, false);
        let full = self.eval(req, now, true);
        match (enforced, full) {
            ((true, policy, rule), (false, audit, audit_rule)) => Verdict {
                allow: true,
                policy,
                rule,
                audit_denied_by: Some(audit),
                audit_rule,
            },
            ((allow, policy, rule), _) => Verdict {
                allow,
                policy,
                rule,
                audit_denied_by: None,
                audit_rule: None,
            },
        }
    }

    /// The decision counting only enforcing policies (`with_audit` false) or all of them.
    fn eval(
        &self,
        req: &Request<'_>,
        now: jiff::Timestamp,
        with_audit: bool,
    ) -> (bool, Arc<str>, Option<u32>) {
        let active = self
            .policies
            .iter()
            .filter(|p| with_audit || p.mode == AuthzMode::Enforce);
        let mut allow_policies = false;
        let mut allowed_by = None;
        for p in active {
            let matched = p
                .rules
                .iter()
                .position(|r| r.matches(req, now))
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX));
            match p.action {
                AuthzAction::Deny if matched.is_some() => return (false, p.name.clone(), matched),
                AuthzAction::Deny => {}
                AuthzAction::Allow => {
                    allow_policies = true;
                    if matched.is_some() && allowed_by.is_none() {
                        allowed_by = Some((p.name.clone(), matched));
                    }
                }
            }
        }
        if allow_policies {
            return match allowed_by {
                Some((name, rule)) => (true, name, rule),
                None => (false, "no-allow-policy-matched".into(), None),
            };
        }
        let default_allows = self.default_action == AuthzAction::Allow
            || (!with_audit && self.default_mode == AuthzMode::Audit);
        (default_allows, self.default_name.clone(), None)
    }
}

/// Whether an inbound port's policy needs layer 7: an authorization rule that reads the
/// request (see [`Authz::needs_layer7`]) or a `RequestAuthentication` that applies. Such a
/// port serves only HTTP: anything else is refused, never forwarded as bytes.
pub fn requires_http(authz: &Authz, authn: &crate::jwt::Authn, port: u16) -> bool {
    authz.needs_layer7(port) || !authn.is_empty()
}

impl Rule {
    fn needs_layer7(&self) -> bool {
        !self.paths.is_empty()
            || !self.methods.is_empty()
            || !self.headers.is_empty()
            || !self.claims.is_empty()
    }

    fn matches(&self, req: &Request<'_>, now: jiff::Timestamp) -> bool {
        self.check(req, now).is_ok()
    }

    /// Whether the rule matches, else the first condition it fails (its field in the
    /// policy), for `trellis explain`. The request path uses the same check.
    #[inline]
    fn check(&self, req: &Request<'_>, now: jiff::Timestamp) -> Result<(), &'static str> {
        if !self.identities.is_empty()
            && !req
                .peer
                .is_some_and(|p| self.identities.iter().any(|i| i == p))
        {
            return Err("from.identities");
        }
        if !self.namespaces.is_empty()
            && !req
                .peer
                .and_then(namespace_of)
                .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
        {
            return Err("from.namespaces");
        }
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return Err("to.ports");
        }
        let needs_http =
            !self.paths.is_empty() || !self.methods.is_empty() || !self.headers.is_empty();
        if needs_http {
            // HTTP conditions never match an opaque connection.
            let Some((method, path, headers)) = req.http else {
                return Err("to (not an HTTP request)");
            };
            if !self.paths.is_empty() && !self.paths.iter().any(|p| path_matches(p, path)) {
                return Err("to.paths");
            }
            if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method.as_str()) {
                return Err("to.methods");
            }
            for (name, values) in &self.headers {
                let ok = headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| values.iter().any(|x| x == v)));
                if !ok {
                    return Err("to.headers");
                }
            }
        }
        for (name, values) in &self.claims {
            let ok = req
                .claims
                .and_then(|c| c.get(name))
                .is_some_and(|v| match v {
                    serde_json::Value::String(s) => values.contains(s),
                    serde_json::Value::Array(items) => items
                        .iter()
                        .any(|i| i.as_str().is_some_and(|s| values.iter().any(|v| v == s))),
                    other => values.contains(&other.to_string()),
                });
            if !ok {
                return Err("claims");
            }
        }
        match &self.when {
            Some(w) if !w.contains(now) => Err("when"),
            _ => Ok(()),
        }
    }
}

/// One policy as `trellis explain` shows it: whether it applies and, per rule, whether it
/// matched or the first condition it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyView {
    /// `namespace/name`.
    pub name: Arc<str>,
    /// `Allow` or `Deny`.
    pub action: AuthzAction,
    /// `Enforce` or `Audit`.
    pub mode: AuthzMode,
    /// Per rule: `Ok` when it matched, else the field of the first failing condition.
    pub rules: Vec<Result<(), &'static str>>,
}

impl PolicyView {
    /// The first rule that matched, if any: the one that decided for this policy.
    pub fn matched_rule(&self) -> Option<usize> {
        self.rules.iter().position(|r| r.is_ok())
    }
}

impl Authz {
    /// [`Authz::decide`]'s verdict with every policy's rules evaluated the same way, in
    /// order, and the default that applies when none decides.
    pub fn explain(
        &self,
        req: &Request<'_>,
        now: jiff::Timestamp,
    ) -> (Verdict, Vec<PolicyView>, (AuthzAction, AuthzMode, Arc<str>)) {
        let verdict = self.decide(req, now);
        let views = self
            .policies
            .iter()
            .map(|p| PolicyView {
                name: p.name.clone(),
                action: p.action,
                mode: p.mode,
                rules: p.rules.iter().map(|r| r.check(req, now)).collect(),
            })
            .collect();
        (
            verdict,
            views,
            (
                self.default_action,
                self.default_mode,
                self.default_name.clone(),
            ),
        )
    }
}

impl Window {
    fn contains(&self, now: jiff::Timestamp) -> bool {
        let local = now.to_zoned(self.tz.clone());
        let minute =
            u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
        let today = weekday(local.weekday());
        let yesterday = weekday(local.weekday().previous());
        let day_ok = |d: Weekday| self.days.is_empty() || self.days.contains(&d);
        if self.start < self.end {
            day_ok(today) && minute >= self.start && minute < self.end
        } else {
            // Wraps past midnight: the evening part belongs to today, the early-morning part to
            // the day the window started.
            (day_ok(today) && minute >= self.start) || (day_ok(yesterday) && minute < self.end)
        }
    }
}

fn weekday(d: jiff::civil::Weekday) -> Weekday {
    use jiff::civil::Weekday as W;
    match d {
        W::Monday => Weekday::Mon,
        W::Tuesday => Weekday::Tue,
        W::Wednesday => Weekday::Wed,
        W::Thursday => Weekday::Thu,
        W::Friday => Weekday::Fri,
        W::Saturday => Weekday::Sat,
        W::Sunday => Weekday::Sun,
    }
}

/// The namespace of a SPIFFE id `spiffe://td/ns/NS/sa/SA`.
pub(crate) fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next()
}

fn path_matches(pattern: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(prefix) => path == prefix || path.starts_with(&format!("{prefix}/")),
        None => path == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AuthorizationPolicySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const ORDERS: &str = "spiffe://td/ns/shop/sa/orders";
    const WEB: &str = "spiffe://td/ns/web/sa/frontend";

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn rule_kinds_table() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        let mut headers = http::HeaderMap::new();
        headers.insert("x-role", "admin".parse().unwrap());
        let none = http::HeaderMap::new();
        let noon = at("2026-11-23T12:00:00Z"); // a Monday
        let http = |m, p, h| Request {
            peer: Some(ORDERS),
            http: Some((m, p, h)),
            port: 8080,
            claims: None,
        };
        let allow_orders =
            format!("action: Allow\nrules: [{{from: {{identities: [\"{ORDERS}\"]}}}}]");
        let allow_web = format!("action: Allow\nrules: [{{from: {{identities: [\"{WEB}\"]}}}}]");
        type Case<'a> = (&'a str, Request<'a>, jiff::Timestamp, bool);
        let cases: Vec<Case> = vec![
            // identity: exact, and all of a namespace
            (&allow_orders, http(&get, "/", &none), noon, true),
            (&allow_web, http(&get, "/", &none), noon, false),
            (
                "action: Allow\nrules: [{from: {namespaces: [shop]}}]",
                http(&get, "/", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{from: {namespaces: [web]}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
            // no identity (plaintext) never matches an identity condition
            (
                "action: Allow\nrules: [{from: {namespaces: [shop]}}]",
                Request {
                    peer: None,
                    http: Some((&get, "/", &none)),
                    port: 8080,
                    claims: None,
                },
                noon,
                false,
            ),
            // path exact / prefix / any; method; header; port
            (
                "action: Allow\nrules: [{to: {paths: [/orders]}}]",
                http(&get, "/orders?id=1", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{to: {paths: [/orders]}}]",
                http(&get, "/orders/1", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{to: {paths: [/orders/*]}}]",
                http(&get, "/orders/1", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{to: {paths: [/orders/*]}}]",
                http(&get, "/ordersx", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{to: {paths: ['*']}}]",
                http(&get, "/x", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{to: {methods: [GET]}}]",
                http(&post, "/", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{to: {headers: [{name: X-Role, values: [admin]}]}}]",
                http(&get, "/", &headers),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{to: {headers: [{name: x-role, values: [admin]}]}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{to: {ports: [8080]}}]",
                http(&get, "/", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{to: {ports: [9090]}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
            // HTTP conditions never match TCP; identity ones do
            (
                "action: Allow\nrules: [{to: {paths: ['*']}}]",
                Request {
                    peer: Some(ORDERS),
                    http: None,
                    port: 8080,
                    claims: None,
                },
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{from: {namespaces: [shop]}}]",
                Request {
                    peer: Some(ORDERS),
                    http: None,
                    port: 8080,
                    claims: None,
                },
                noon,
                true,
            ),
            // deny wins over allow elsewhere; a non-matching deny denies nothing
            (
                "action: Deny\nrules: [{to: {paths: [/admin/*]}}]",
                http(&get, "/admin/x", &none),
                noon,
                false,
            ),
            (
                "action: Deny\nrules: [{to: {paths: [/admin/*]}}]",
                http(&get, "/public", &none),
                noon,
                true,
            ),
            // time windows, in a time zone, with days; wrapping past midnight
            (
                "action: Allow\nrules: [{when: {start: '09:00', end: '17:00', timeZone: Europe/Berlin}}]",
                http(&get, "/", &none),
                noon,
                true,
            ),
            (
                "action: Allow\nrules: [{when: {start: '09:00', end: '12:30', timeZone: Europe/Berlin}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{when: {start: '09:00', end: '17:00', timeZone: Europe/Berlin, days: [Sat, Sun]}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
            (
                "action: Allow\nrules: [{when: {start: '22:00', end: '06:00', timeZone: UTC, days: [Sun]}}]",
                http(&get, "/", &none),
                at("2026-11-23T03:00:00Z"),
                true,
            ),
            (
                "action: Allow\nrules: [{when: {start: '22:00', end: '06:00', timeZone: UTC, days: [Mon]}}]",
                http(&get, "/", &none),
                at("2026-11-23T03:00:00Z"),
                false,
            ),
            (
                "action: Allow\nrules: [{when: {start: '22:00', end: '06:00', timeZone: UTC}}]",
                http(&get, "/", &none),
                noon,
                false,
            ),
        ];
        for (yaml, req, now, want) in cases {
            let s = spec(yaml);
            let a = Authz::new(
                &[("shop/p".into(), &s)],
                AuthzAction::Allow,
                AuthzMode::Enforce,
                "default",
            )
            .unwrap();
            assert_eq!(a.decide(&req, now).allow, want, "{yaml} {req:?} at {now}");
        }
    }

    #[test]
    fn layer7_needs_table() {
        // (policies, destination port, whether the port must refuse what is not HTTP)
        let cases: &[(&[&str], u16, bool)] = &[
            (&[], 8080, false),
            // identity, namespace, port and time conditions work on opaque TCP
            (
                &[&format!(
                    "action: Allow\nrules: [{{from: {{identities: [\"{ORDERS}\"]}}}}]"
                )],
                8080,
                false,
            ),
            (
                &["action: Deny\nrules: [{from: {namespaces: [web]}, to: {ports: [8080]}}]"],
                8080,
                false,
            ),
            (
                &["action: Allow\nrules: [{when: {start: '09:00', end: '17:00', timeZone: UTC}}]"],
                8080,
                false,
            ),
            // paths, methods, headers and claims need the request, whatever the action
            (
                &["action: Deny\nrules: [{to: {paths: [/admin/*]}}]"],
                8080,
                true,
            ),
            (
                &["action: Allow\nrules: [{to: {methods: [GET]}}]"],
                8080,
                true,
            ),
            (
                &["action: Allow\nrules: [{to: {headers: [{name: x-role, values: [a]}]}}]"],
                8080,
                true,
            ),
            (
                &["action: Allow\nrules: [{claims: [{name: role, values: [admin]}]}]"],
                8080,
                true,
            ),
            // audit mode too: what it reports must be what the request was
            (
                &["action: Deny\nmode: Audit\nrules: [{to: {paths: [/admin/*]}}]"],
                8080,
                true,
            ),
            // one such rule among TCP-only ones is enough
            (
                &[
                    "action: Allow\nrules: [{from: {namespaces: [shop]}}]",
                    "action: Deny\nrules: [{from: {namespaces: [web]}}, {to: {paths: [/x]}}]",
                ],
                8080,
                true,
            ),
            // a rule limited to other ports does not apply here
            (
                &["action: Deny\nrules: [{to: {ports: [9090], paths: [/admin/*]}}]"],
                8080,
                false,
            ),
            (
                &["action: Deny\nrules: [{to: {ports: [9090], paths: [/admin/*]}}]"],
                9090,
                true,
            ),
        ];
        for (yamls, port, want) in cases {
            let specs: Vec<AuthorizationPolicySpec> = yamls.iter().map(|y| spec(y)).collect();
            let named: Vec<(String, &AuthorizationPolicySpec)> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("shop/p{i}"), s))
                .collect();
            let a = Authz::new(&named, AuthzAction::Deny, AuthzMode::Enforce, "default").unwrap();
            let none = crate::jwt::Authn::default();
            assert_eq!(
                requires_http(&a, &none, *port),
                *want,
                "{yamls:?} at {port}"
            );
        }
        // A RequestAuthentication that applies needs the request's headers, even with no
        // policy and a token that is optional.
        let authn_spec: trellis_api::authn::RequestAuthenticationSpec = serde_saphyr::from_str(
            "jwtRules: [{issuer: https://auth.test, jwksUri: 'http://127.0.0.1:9/jwks'}]",
        )
        .unwrap();
        let authn = crate::jwt::compile(&[&authn_spec], &Default::default()).unwrap();
        let open = Authz::new(&[], AuthzAction::Allow, AuthzMode::Enforce, "default").unwrap();
        assert!(requires_http(&open, &authn, 8080));
        assert!(!requires_http(&open, &Default::default(), 8080));
    }

    #[test]
    fn the_verdict_names_the_rule_that_decided() {
        let get = http::Method::GET;
        let none = http::HeaderMap::new();
        let now = at("2026-11-23T12:00:00Z");
        let req = |peer, path| Request {
            peer: Some(peer),
            http: Some((&get, path, &none)),
            port: 80,
            claims: None,
        };
        let deny = spec("action: Deny\nrules: [{to: {paths: [/a]}}, {to: {paths: [/admin/*]}}]");
        let allow = spec(&format!(
            "action: Allow\nrules: [{{from: {{namespaces: [web]}}}}, {{from: {{identities: [\"{ORDERS}\"]}}}}]"
        ));
        let audit = spec(
            "action: Deny\nmode: Audit\nrules: [{to: {paths: [/x]}}, {to: {paths: [/audited]}}]",
        );
        let a = Authz::new(
            &[
                ("shop/audit".into(), &audit),
                ("shop/deny".into(), &deny),
                ("shop/allow".into(), &allow),
            ],
            AuthzAction::Allow,
            AuthzMode::Enforce,
            "default",
        )
        .unwrap();
        // (request, allowed, deciding policy and rule, audit policy and rule)
        let cases = [
            (req(ORDERS, "/admin/x"), false, ("shop/deny", Some(1)), None),
            (req(ORDERS, "/ok"), true, ("shop/allow", Some(1)), None),
            (req(WEB, "/ok"), true, ("shop/allow", Some(0)), None),
            (
                req("spiffe://td/ns/other/sa/x", "/ok"),
                false,
                ("no-allow-policy-matched", None),
                None,
            ),
            (
                req(ORDERS, "/audited"),
                true,
                ("shop/allow", Some(1)),
                Some(("shop/audit", Some(1))),
            ),
        ];
        for (r, allow, (policy, rule), audit) in cases {
            let v = a.decide(&r, now);
            assert_eq!(
                (v.allow, &*v.policy, v.rule),
                (allow, policy, rule),
                "{r:?}"
            );
            assert_eq!(
                v.audit_denied_by.as_deref().map(|p| (p, v.audit_rule)),
                audit,
                "{r:?}"
            );
        }
    }

    #[test]
    fn defaults_deny_wins_and_audit_mode() {
        let get = http::Method::GET;
        let none = http::HeaderMap::new();
        let now = at("2026-11-23T12:00:00Z");
        let req = Request {
            peer: Some(ORDERS),
            http: Some((&get, "/admin/x", &none)),
            port: 80,
            claims: None,
        };
        // No policies: the default decides.
        let open = Authz::new(&[], AuthzAction::Allow, AuthzMode::Enforce, "default").unwrap();
        assert!(open.decide(&req, now).allow);
        let closed = Authz::new(
            &[],
            AuthzAction::Deny,
            AuthzMode::Enforce,
            "MeshConfig default/mesh",
        )
        .unwrap();
        let v = closed.decide(&req, now);
        assert!(!v.allow);
        assert_eq!(&*v.policy, "MeshConfig default/mesh");
        // Default deny in audit mode: allowed, reported.
        let audited = Authz::new(
            &[],
            AuthzAction::Deny,
            AuthzMode::Audit,
            "MeshConfig default/mesh",
        )
        .unwrap();
        let v = audited.decide(&req, now);
        assert!(v.allow);
        assert_eq!(
            v.audit_denied_by.as_deref(),
            Some("MeshConfig default/mesh")
        );
        // Claims: a string claim equal to a value, or an array claim containing one.
        let by_role = spec("action: Allow\nrules: [{claims: [{name: roles, values: [admin]}]}]");
        let a = Authz::new(
            &[("shop/admins".into(), &by_role)],
            AuthzAction::Allow,
            AuthzMode::Enforce,
            "default",
        )
        .unwrap();
        let admin: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"roles": ["reader", "admin"]}"#).unwrap();
        let reader: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"roles": "reader"}"#).unwrap();
        assert!(
            a.decide(
                &Request {
                    claims: Some(&admin),
                    ..req
                },
                now
            )
            .allow
        );
        assert!(
            !a.decide(
                &Request {
                    claims: Some(&reader),
                    ..req
                },
                now
            )
            .allow
        );
        assert!(!a.decide(&req, now).allow, "no token, no claims");
        // Deny beats a matching allow, and names itself.
        let allow = spec("action: Allow\nrules: [{from: {namespaces: [shop]}}]");
        let deny = spec("action: Deny\nrules: [{to: {paths: [/admin/*]}}]");
        let both = Authz::new(
            &[("shop/allow".into(), &allow), ("shop/deny".into(), &deny)],
            AuthzAction::Allow,
            AuthzMode::Enforce,
            "default",
        )
        .unwrap();
        let v = both.decide(&req, now);
        assert_eq!((v.allow, &*v.policy), (false, "shop/deny"));
        // With an Allow policy present, a request it does not match is denied.
        let other = Request {
            peer: Some(WEB),
            ..req
        };
        let only_allow = Authz::new(
            &[("shop/allow".into(), &allow)],
            AuthzAction::Allow,
            AuthzMode::Enforce,
            "default",
        )
        .unwrap();
        let v = only_allow.decide(&other, now);
        assert_eq!((v.allow, &*v.policy), (false, "no-allow-policy-matched"));
        // The deny in audit mode: allowed, and reported as what would have denied.
        let deny_audit = spec("action: Deny\nmode: Audit\nrules: [{to: {paths: [/admin/*]}}]");
        let a = Authz::new(
            &[
                ("shop/allow".into(), &allow),
                ("shop/deny".into(), &deny_audit),
            ],
            AuthzAction::Allow,
            AuthzMode::Enforce,
            "default",
        )
        .unwrap();
        let v = a.decide(&req, now);
        assert!(v.allow);
        assert_eq!(&*v.policy, "shop/allow");
        assert_eq!(v.audit_denied_by.as_deref(), Some("shop/deny"));
    }
}
