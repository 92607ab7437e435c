//! Route tables and the pure choice of a rule for a request, with the Gateway API's
//! precedence rules.
//!
//! HTTPRoute precedence (across every rule attached to one service port), per match:
//! exact path, then regular-expression path (longer pattern first — implementation-specific in
//! the spec), then path prefix by length; then a method match; then more header matches; then
//! more query matches; then the older route, then `namespace/name`, then rule and match order.
//! GRPCRoute: longer matching service, then longer method, then more header matches, then age
//! and name. Mesh routes ignore `hostnames` (GAMMA: the parent Service already names the host).

use crate::filters::Filters;
use crate::snapshot::Backend;
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use std::sync::Arc;
use std::time::Duration;

/// A rule's backend with its weight.
#[derive(Debug)]
pub struct WeightedBackend {
    /// The backend.
    pub backend: Arc<Backend>,
    /// Relative weight.
    pub weight: u32,
    /// Filters applied when this backend is chosen.
    pub filters: Filters,
    /// Request metrics for this rule and backend.
    pub stats: Arc<crate::metrics::RouteStats>,
    /// The rule's `retry` over this backend's policy, when the rule has one.
    pub retry: Option<Arc<crate::retry::Policy>>,
}

/// A backend reference of a rule that does not resolve (no such Service, or not a Service).
/// It keeps its weight: the Gateway API answers its share of traffic with 500.
#[derive(Debug)]
pub struct Unresolved {
    /// Why, for example `Service default/catalog-v3 does not exist`.
    pub why: Arc<str>,
    /// Relative weight among the rule's backends.
    pub weight: u32,
}

/// A weighted choice among a rule's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Index into [`Rule::backends`].
    Backend(usize),
    /// Index into [`Rule::unresolved`].
    Unresolved(usize),
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/route/rule-name-or-index`, used in metrics and explanations.
    pub id: Arc<str>,
    /// Rule filters.
    pub filters: Filters,
    /// Weighted backends; empty answers 500 (Gateway API).
    pub backends: Vec<WeightedBackend>,
    /// End-to-end request timeout, overriding the backend's.
    pub timeout: Option<Option<Duration>>,
    /// Time for one try (`timeouts.backendRequest`).
    pub try_timeout: Option<Duration>,
    /// Session persistence, when the rule asks for it.
    pub session: Option<Arc<crate::session::Persistence>>,
    /// Backend references that do not resolve, with their weights.
    pub unresolved: Vec<Unresolved>,
}

impl Rule {
    /// Picks by weight among resolved and unresolved backends; `None` when every weight is 0.
    /// Without unresolved backends this is exactly [`Rule::pick_backend`].
    pub fn pick(&self, random: u64) -> Option<Pick> {
        let resolved: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        let missing: u64 = self.unresolved.iter().map(|u| u64::from(u.weight)).sum();
        let total = resolved + missing;
        if total == 0 {
            return None;
        }
        let mut pos = random % total;
        if pos < resolved {
            return self.pick_backend(pos).map(Pick::Backend);
        }
        pos -= resolved;
        for (i, u) in self.unresolved.iter().enumerate() {
            if pos < u64::from(u.weight) {
                return Some(Pick::Unresolved(i));
            }
            pos -= u64::from(u.weight);
        }
        None
    }

    /// Picks a backend's index by weight given a uniform random number.
    pub fn pick_backend(&self, random: u64) -> Option<usize> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut pos = random % total;
        for (i, b) in self.backends.iter().enumerate() {
            if pos < u64::from(b.weight) {
                return Some(i);
            }
            pos -= u64::from(b.weight);
        }
        None
    }
}

/// How a path condition is checked.
#[derive(Debug)]
pub enum PathMatch {
    /// Whole path equal.
    Exact(String),
    /// Path-element prefix (stored without a trailing `/`, except the root `/`).
    Prefix(String),
    /// Whole path matches.
    Regex(Regex),
}

/// How a value is checked.
#[derive(Debug)]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// Whole value matches.
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// A compiled HTTP match.
#[derive(Debug)]
pub struct HttpMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Method condition.
    pub method: Option<Method>,
    /// Header conditions.
    pub headers: Vec<(HeaderName, ValueMatch)>,
    /// Query conditions.
    pub query: Vec<(String, ValueMatch)>,
}

/// Builds an anchored regex (Gateway API regex matches are whole-value).
pub fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// A request as routing sees it.
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, if any.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl HttpMatch {
    /// Whether `req` satisfies every condition. Returns the length of the matched prefix (for
    /// `ReplacePrefixMatch`) on success.
    pub fn matches(&self, req: &RequestView) -> Option<usize> {
        let prefix_len = match &self.path {
            PathMatch::Exact(p) => (req.path == p).then_some(p.len())?,
            PathMatch::Prefix(p) => {
                prefix_matches(p, req.path).then_some(if p == "/" { 0 } else { p.len() })?
            }
            PathMatch::Regex(r) => r.is_match(req.path).then_some(0)?,
        };
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return None;
        }
        for (name, m) in &self.headers {
            let value = req.headers.get(name).and_then(|v| v.to_str().ok())?;
            if !m.matches(value) {
                return None;
            }
        }
        for (name, m) in &self.query {
            let value = query_param(req.query.unwrap_or(""), name)?;
            if !m.matches(&value) {
                return None;
            }
        }
        Some(prefix_len)
    }
}

/// Path-element prefix match: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first value of query parameter `name`, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// HTTP routes attached to one service port, in precedence order.
#[derive(Debug, Default)]
pub struct HttpRoutes {
    /// `(match, rule)` pairs, highest precedence first.
    pub entries: Vec<(HttpMatch, Arc<Rule>)>,
}

/// The rule a request matched.
pub struct Selected<'a> {
    /// The rule.
    pub rule: &'a Arc<Rule>,
    /// Length of the path prefix the match consumed (0 for non-prefix matches).
    pub prefix_len: usize,
}

impl HttpRoutes {
    /// The highest-precedence rule matching `req`.
    pub fn select(&self, req: &RequestView) -> Option<Selected<'_>> {
        self.entries.iter().find_map(|(m, rule)| {
            m.matches(req)
                .map(|prefix_len| Selected { rule, prefix_len })
        })
    }
}

/// Sort key for HTTP matches: smaller sorts first (wins).
pub fn http_precedence(
    m: &HttpMatch,
) -> (
    u8,
    std::cmp::Reverse<usize>,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
) {
    let (kind, len) = match &m.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Regex(r) => (1, r.as_str().len()),
        PathMatch::Prefix(p) => (2, p.len()),
    };
    use std::cmp::Reverse;
    (
        kind,
        Reverse(len),
        m.method.is_none(),
        Reverse(m.headers.len()),
        Reverse(m.query.len()),
    )
}

/// A compiled gRPC match.
#[derive(Debug)]
pub struct GrpcMatch {
    /// Service condition.
    pub service: Option<ValueMatch>,
    /// Method condition.
    pub method: Option<ValueMatch>,
    /// Header conditions.
    pub headers: Vec<(HeaderName, ValueMatch)>,
}

impl GrpcMatch {
    /// Whether a call to `/service/method` with `headers` matches.
    pub fn matches(&self, service: &str, method: &str, headers: &HeaderMap) -> bool {
        self.service.as_ref().is_none_or(|m| m.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
            && self.headers.iter().all(|(n, m)| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| m.matches(v))
            })
    }
}

/// Sort key for gRPC matches.
pub fn grpc_precedence(
    m: &GrpcMatch,
) -> (
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
) {
    let len = |v: &Option<ValueMatch>| match v {
        Some(ValueMatch::Exact(s)) => s.len() + 1000,
        Some(ValueMatch::Regex(r)) => r.as_str().len(),
        None => 0,
    };
    use std::cmp::Reverse;
    (
        Reverse(len(&m.service)),
        Reverse(len(&m.method)),
        Reverse(m.headers.len()),
    )
}

/// gRPC routes attached to one service port, in precedence order.
#[derive(Debug, Default)]
pub struct GrpcRoutes {
    /// `(match, rule)` pairs, highest precedence first.
    pub entries: Vec<(GrpcMatch, Arc<Rule>)>,
}

impl GrpcRoutes {
    /// The rule for a call to `path` (`/package.Service/Method`), if any.
    pub fn select(&self, path: &str, headers: &HeaderMap) -> Option<&Arc<Rule>> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        self.entries
            .iter()
            .find(|(m, _)| m.matches(service, method, headers))
            .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_match_is_per_path_element() {
        for (prefix, path, want) in [
            ("/", "/anything", true),
            ("/abc", "/abc", true),
            ("/abc", "/abc/", true),
            ("/abc", "/abc/def", true),
            ("/abc", "/abcd", false),
            ("/abc", "/ab", false),
        ] {
            assert_eq!(prefix_matches(prefix, path), want, "{prefix} {path}");
        }
    }

    #[test]
    fn query_params_decode_and_take_the_first() {
        let q = "a=1&b=hello%20world&a=2&flag&bad=%zz&c=%";
        assert_eq!(query_param(q, "a").as_deref(), Some("1"));
        assert_eq!(query_param(q, "b").as_deref(), Some("hello world"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad").as_deref(), Some("%zz"));
        assert_eq!(query_param(q, "c").as_deref(), Some("%"));
        assert_eq!(query_param(q, "missing"), None);
        // Arbitrary input never panics.
        for _ in 0..10_000 {
            let s: String = (0..crate::rand::below(24))
                .map(|_| ["%", "=", "&", "a", "é", "%4", "1"][crate::rand::below(7) as usize])
                .collect();
            let _ = query_param(&s, "a");
        }
    }
}
