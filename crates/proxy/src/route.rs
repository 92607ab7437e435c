//! Route tables and the pure choice of a rule for a request, with the Gateway API's
//! precedence rules.
//!
//! HTTPRoute precedence (across every rule attached to one service port), per match:
//! exact path, then regular-expression path (longer pattern first — implementation-specific in
//! the spec), then path prefix by length; then a method match; then more header matches; then
//! more query matches; then the older route, then `namespace/name`, then rule and match order.
//! GRPCRoute: longer matching service, then longer method, then more header matches, then age
//! and name. Mesh routes ignore `hostnames` (GAMMA: the parent Service already names the host).
//! Which routes attach to a port at all is `attach.rs`'s decision.

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
#[derive(Debug, Default)]
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

/// The items in a vector with room for exactly them, for what lives as long as a snapshot.
/// `collect` over a vector's `into_iter` reuses the source's buffer, which is larger here
/// (bigger elements, room left by growth), and a shrinking `realloc` (`shrink_to_fit`) may
/// keep the block: mimalloc keeps it when the new size is at least half the old.
pub fn exact<T>(items: impl ExactSizeIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::with_capacity(items.len());
    out.extend(items);
    out
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

/// The first condition of a match that a request fails, for `trellis explain`. Conditions
/// are checked in this order, so a later variant means the request came closer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Miss {
    /// The path condition.
    Path,
    /// The method condition.
    Method,
    /// Header condition `i` (index into [`HttpMatch::headers`]).
    Header(usize),
    /// Query condition `i` (index into [`HttpMatch::query`]).
    Query(usize),
}

impl HttpMatch {
    /// Whether `req` satisfies every condition. Returns the length of the matched prefix (for
    /// `ReplacePrefixMatch`) on success.
    pub fn matches(&self, req: &RequestView) -> Option<usize> {
        self.check(req).ok()
    }

    /// Like [`HttpMatch::matches`], saying which condition failed first. The request path
    /// and `trellis explain` share this one check.
    #[inline]
    pub fn check(&self, req: &RequestView) -> Result<usize, Miss> {
        let prefix_len = match &self.path {
            PathMatch::Exact(p) => (req.path == p).then_some(p.len()),
            PathMatch::Prefix(p) => {
                prefix_matches(p, req.path).then_some(if p == "/" { 0 } else { p.len() })
            }
            PathMatch::Regex(r) => r.is_match(req.path).then_some(0),
        }
        .ok_or(Miss::Path)?;
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return Err(Miss::Method);
        }
        for (i, (name, m)) in self.headers.iter().enumerate() {
            let value = req.headers.get(name).and_then(|v| v.to_str().ok());
            if !value.is_some_and(|v| m.matches(v)) {
                return Err(Miss::Header(i));
            }
        }
        for (i, (name, m)) in self.query.iter().enumerate() {
            let value = query_param(req.query.unwrap_or(""), name);
            if !value.is_some_and(|v| m.matches(&v)) {
                return Err(Miss::Query(i));
            }
        }
        Ok(prefix_len)
    }

    /// Why `miss` failed, in words: the condition and what the request had.
    pub fn describe(&self, miss: Miss, req: &RequestView) -> String {
        match miss {
            Miss::Path => format!("path {} does not match {}", req.path, self.path.describe()),
            Miss::Method => format!(
                "method {} is not {}",
                req.method,
                self.method.as_ref().map_or("", |m| m.as_str())
            ),
            Miss::Header(i) => {
                let (name, m) = &self.headers[i];
                match req.headers.get(name).and_then(|v| v.to_str().ok()) {
                    Some(v) => format!("header {name}: {v:?} does not match {}", m.describe()),
                    None => format!("header {name} is absent (wanted {})", m.describe()),
                }
            }
            Miss::Query(i) => {
                let (name, m) = &self.query[i];
                match query_param(req.query.unwrap_or(""), name) {
                    Some(v) => format!("query {name}={v:?} does not match {}", m.describe()),
                    None => format!("query parameter {name} is absent (wanted {})", m.describe()),
                }
            }
        }
    }

    /// The match's conditions, in words.
    pub fn describe_conditions(&self) -> String {
        let mut out = self.path.describe();
        if let Some(m) = &self.method {
            out += &format!(", method {m}");
        }
        for (n, v) in &self.headers {
            out += &format!(", header {n} {}", v.describe());
        }
        for (n, v) in &self.query {
            out += &format!(", query {n} {}", v.describe());
        }
        out
    }
}

impl PathMatch {
    /// The condition, in words.
    pub fn describe(&self) -> String {
        match self {
            PathMatch::Exact(p) => format!("exact {p}"),
            PathMatch::Prefix(p) => format!("prefix {p}"),
            PathMatch::Regex(r) => format!("regex {}", r.as_str()),
        }
    }
}

impl ValueMatch {
    /// The condition, in words.
    pub fn describe(&self) -> String {
        match self {
            ValueMatch::Exact(e) => format!("= {e:?}"),
            // The stored pattern is anchored by [`anchored`]; show what the user wrote.
            ValueMatch::Regex(r) => {
                let s = r.as_str();
                let inner = s
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s);
                format!("~ {inner}")
            }
        }
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

/// When a route was created: known times first, oldest first; routes read from a file carry
/// none and come after every stored route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Created {
    /// `metadata.creationTimestamp`.
    At(jiff::Timestamp),
    /// No creation time.
    Unknown,
}

/// Where a match comes from, for the spec's ties between equally specific matches: the older
/// route, then `namespace/name` in alphabetical order, then rule order, then match order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    /// The route's creation time.
    pub created: Created,
    /// `namespace/name` of the route, compared as one string as the spec words it.
    pub route: Arc<str>,
    /// Index of the rule in the route.
    pub rule: usize,
    /// Index of the match in the rule.
    pub index: usize,
}

impl HttpRoutes {
    /// The table for one port: most specific match first, ties broken by [`Order`].
    pub fn new(mut entries: Vec<(HttpMatch, Arc<Rule>, Order)>) -> HttpRoutes {
        entries.sort_by(|a, b| (http_precedence(&a.0), &a.2).cmp(&(http_precedence(&b.0), &b.2)));
        HttpRoutes {
            entries: exact(entries.into_iter().map(|(m, r, _)| (m, r))),
        }
    }
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

    /// What [`HttpRoutes::select`] decides, with its reasons: the index of the winning entry
    /// (if any) and, for every entry of higher precedence, the condition it failed. Without
    /// a winner, every entry is listed. The same check as `select`, in the same order.
    pub fn explain(&self, req: &RequestView) -> (Option<usize>, Vec<(usize, Miss)>) {
        let mut missed = Vec::new();
        for (i, (m, _)) in self.entries.iter().enumerate() {
            match m.check(req) {
                Ok(_) => return (Some(i), missed),
                Err(miss) => missed.push((i, miss)),
            }
        }
        (None, missed)
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
    /// The table for one port: most specific match first, ties broken by [`Order`].
    pub fn new(mut entries: Vec<(GrpcMatch, Arc<Rule>, Order)>) -> GrpcRoutes {
        entries.sort_by(|a, b| (grpc_precedence(&a.0), &a.2).cmp(&(grpc_precedence(&b.0), &b.2)));
        GrpcRoutes {
            entries: exact(entries.into_iter().map(|(m, r, _)| (m, r))),
        }
    }

    /// The rule for a call to `path` (`/package.Service/Method`), if any.
    pub fn select(&self, path: &str, headers: &HeaderMap) -> Option<&Arc<Rule>> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        self.entries
            .iter()
            .find(|(m, _)| m.matches(service, method, headers))
            .map(|(_, r)| r)
    }

    /// What [`GrpcRoutes::select`] decides: the winning entry's index, and the entries of
    /// higher precedence that did not match (every entry when none did).
    pub fn explain(&self, path: &str, headers: &HeaderMap) -> (Option<usize>, Vec<usize>) {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return (None, (0..self.entries.len()).collect());
        };
        match self
            .entries
            .iter()
            .position(|(m, _)| m.matches(service, method, headers))
        {
            Some(i) => (Some(i), (0..i).collect()),
            None => (None, (0..self.entries.len()).collect()),
        }
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

/// Table tests of the choice itself: tables built from matches written as route YAML, then
/// requests and the rule each must take.
#[cfg(test)]
mod select_tests {
    use super::*;
    use crate::snapshot::{compile_grpc_match, compile_http_match};

    /// `(method, path?query, headers, (rule, prefix length))`.
    type HttpCase<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<(&'a str, usize)>,
    );
    /// `(path, headers, rule)`.
    type GrpcCase<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);

    fn order(route: &str, created: Option<&str>, rule: usize, index: usize) -> Order {
        Order {
            created: created.map_or(Created::Unknown, |t| {
                Created::At(trellis_api::meta::parse_rfc3339(t).unwrap())
            }),
            route: route.into(),
            rule,
            index,
        }
    }

    fn rule(id: &str) -> Arc<Rule> {
        Arc::new(Rule {
            id: id.into(),
            ..Rule::default()
        })
    }

    /// One route `ns/r`, one rule per match, named by index.
    fn http_table(matches: &[&str]) -> HttpRoutes {
        HttpRoutes::new(
            matches
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let m = compile_http_match(&serde_saphyr::from_str(m).unwrap()).unwrap();
                    (m, rule(&i.to_string()), order("ns/r", None, i, 0))
                })
                .collect(),
        )
    }

    fn grpc_table(matches: &[&str]) -> GrpcRoutes {
        GrpcRoutes::new(
            matches
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let m = compile_grpc_match(&serde_saphyr::from_str(m).unwrap()).unwrap();
                    (m, rule(&i.to_string()), order("ns/r", None, i, 0))
                })
                .collect(),
        )
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                http::HeaderValue::try_from(*v).unwrap(),
            );
        }
        h
    }

    /// The rule chosen for each `(method, path?query, headers)`, and the prefix length.
    fn check_http(table: &HttpRoutes, cases: &[HttpCase]) {
        for (method, target, hs, want) in cases {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (*target, None),
            };
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let hs = headers(hs);
            let view = RequestView {
                method: &method,
                path,
                query,
                headers: &hs,
            };
            let got = table
                .select(&view)
                .map(|s| (s.rule.id.to_string(), s.prefix_len));
            let want = want.map(|(id, len)| (id.to_string(), len));
            assert_eq!(got, want, "{method} {target} {hs:?}");
        }
    }

    #[test]
    fn every_http_match_kind() {
        let table = http_table(&[
            "{path: {type: Exact, value: /exact}}",
            "{path: {type: PathPrefix, value: /pre/}}",
            "{path: {type: RegularExpression, value: '/re/[0-9]+'}}",
            "{path: {value: /m}, method: DELETE}",
            "{path: {value: /h}, headers: [{name: X-Version, value: two}]}",
            "{path: {value: /hr}, headers: [{type: RegularExpression, name: x-version, value: 'o.e'}]}",
            "{path: {value: /q}, queryParams: [{name: env, value: canary}]}",
            "{path: {value: /qr}, queryParams: [{type: RegularExpression, name: id, value: '[0-9]{3}'}]}",
            "{path: {value: /dup}, headers: [{name: a, value: '1'}, {name: A, value: '2'}], queryParams: [{name: q, value: '1'}, {name: q, value: '2'}]}",
        ]);
        let cases: &[HttpCase] = &[
            ("GET", "/exact", &[], Some(("0", 6))),
            ("GET", "/exact/", &[], None),
            ("GET", "/Exact", &[], None),
            ("GET", "/pre", &[], Some(("1", 4))),
            ("GET", "/pre/", &[], Some(("1", 4))),
            ("GET", "/pre/a/b", &[], Some(("1", 4))),
            ("GET", "/prefix", &[], None),
            ("GET", "/re/42", &[], Some(("2", 0))),
            ("GET", "/re/42/x", &[], None),
            ("GET", "/x/re/42", &[], None),
            ("DELETE", "/m", &[], Some(("3", 2))),
            ("GET", "/m", &[], None),
            ("GET", "/h", &[("x-version", "two")], Some(("4", 2))),
            ("GET", "/h", &[("X-VERSION", "two")], Some(("4", 2))),
            ("GET", "/h", &[("x-version", "Two")], None),
            ("GET", "/h", &[], None),
            ("GET", "/hr", &[("x-version", "one")], Some(("5", 3))),
            ("GET", "/hr", &[("x-version", "ones")], None),
            ("GET", "/q?env=canary", &[], Some(("6", 2))),
            ("GET", "/q?a=1&env=canary&env=prod", &[], Some(("6", 2))),
            ("GET", "/q?env=prod&env=canary", &[], None),
            ("GET", "/q?ENV=canary", &[], None),
            ("GET", "/q?e%6Ev=can%61ry", &[], Some(("6", 2))),
            ("GET", "/qr?id=123", &[], Some(("7", 3))),
            ("GET", "/qr?id=1234", &[], None),
            // Only the first condition of each name counts.
            ("GET", "/dup?q=1", &[("a", "1")], Some(("8", 4))),
            ("GET", "/dup?q=1", &[("a", "2")], None),
            ("GET", "/dup?q=2", &[("a", "1")], None),
            ("GET", "/other", &[], None),
        ];
        check_http(&table, cases);
    }

    #[test]
    fn http_precedence_by_path_kind_and_length() {
        // Written least specific first, so rule order never decides.
        let table = http_table(&[
            "{path: {value: /}}",
            "{path: {value: /a}}",
            "{path: {value: /a/b}}",
            "{path: {type: RegularExpression, value: '/a/.*'}}",
            "{path: {type: RegularExpression, value: '/a/b/[a-z]+'}}",
            "{path: {type: Exact, value: /a/b/c}}",
            "{}",
        ]);
        let cases: &[HttpCase] = &[
            ("GET", "/a/b/c", &[], Some(("5", 6))),
            ("GET", "/a/b/d", &[], Some(("4", 0))),
            ("GET", "/a/b/1", &[], Some(("3", 0))),
            ("GET", "/a/", &[], Some(("3", 0))),
            ("GET", "/a", &[], Some(("1", 2))),
            ("GET", "/ab", &[], Some(("0", 0))),
            ("GET", "/", &[], Some(("0", 0))),
        ];
        check_http(&table, cases);
    }

    #[test]
    fn http_precedence_by_method_headers_and_query_count() {
        let table = http_table(&[
            "{path: {value: /p}, headers: [{name: a, value: '1'}]}",
            "{path: {value: /p}, method: GET}",
            "{path: {value: /p}, headers: [{name: a, value: '1'}, {name: b, value: '2'}]}",
            "{path: {value: /p}, queryParams: [{name: q, value: '1'}]}",
            "{path: {value: /p}, queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}",
            "{path: {value: /p}, headers: [{name: a, value: '1'}], queryParams: [{name: q, value: '1'}]}",
            "{path: {value: /p/longer}}",
            // Repeated names count once: one header condition, not three.
            "{path: {value: /p}, headers: [{name: c, value: '1'}, {name: C, value: '2'}, {name: c, value: '3'}]}",
        ]);
        let ab: &[(&str, &str)] = &[("a", "1"), ("b", "2")];
        let cases: &[HttpCase] = &[
            ("GET", "/p?q=1&r=2", ab, Some(("1", 2))),
            ("POST", "/p?q=1&r=2", ab, Some(("2", 2))),
            ("POST", "/p?q=1", &[("a", "1")], Some(("5", 2))),
            ("POST", "/p", &[("a", "1")], Some(("0", 2))),
            ("POST", "/p?q=1&r=2", &[], Some(("4", 2))),
            ("POST", "/p?q=1", &[], Some(("3", 2))),
            ("GET", "/p/longer", ab, Some(("6", 9))),
            ("POST", "/p", &[], None),
            ("POST", "/p?q=1", &[("c", "1")], Some(("7", 2))),
            // Counted three times, rule 7 would outrank rule 2's two conditions.
            (
                "POST",
                "/p",
                &[("a", "1"), ("b", "2"), ("c", "1")],
                Some(("2", 2)),
            ),
        ];
        check_http(&table, cases);
    }

    #[test]
    fn equal_matches_go_to_the_older_route_then_by_name_then_rule_and_match_order() {
        let slash = || compile_http_match(&Default::default()).unwrap();
        let entries = [
            ("ns/none-2", None, 1, 1),
            ("ns/new", Some("2026-01-01T00:00:00.5Z"), 0, 0),
            ("a/x", None, 0, 0),
            ("ns/none-2", None, 1, 0),
            ("ns/old", Some("2026-01-01T00:00:00Z"), 0, 0),
            ("a-b/x", None, 0, 0),
            ("ns/none-2", None, 0, 0),
            // 23:30 the day before: the oldest, written with an offset.
            ("ns/plus", Some("2026-01-01T00:30:00+01:00"), 0, 0),
        ];
        let table = HttpRoutes::new(
            entries
                .iter()
                .map(|(route, t, r, i)| {
                    (
                        slash(),
                        rule(&format!("{route}#{r}.{i}")),
                        order(route, *t, *r, *i),
                    )
                })
                .collect(),
        );
        let got: Vec<&str> = table.entries.iter().map(|(_, r)| &*r.id).collect();
        assert_eq!(
            got,
            [
                "ns/plus#0.0",
                "ns/old#0.0",
                "ns/new#0.0",
                // `namespace/name` as one string: `-` sorts before `/`.
                "a-b/x#0.0",
                "a/x#0.0",
                "ns/none-2#0.0",
                "ns/none-2#1.0",
                "ns/none-2#1.1",
            ]
        );
        // Specificity comes before age.
        let table = HttpRoutes::new(vec![
            (
                slash(),
                rule("old"),
                order("ns/old", Some("2020-01-01T00:00:00Z"), 0, 0),
            ),
            (
                compile_http_match(&serde_saphyr::from_str("{path: {value: /a}}").unwrap())
                    .unwrap(),
                rule("new"),
                order("ns/new", None, 0, 0),
            ),
        ]);
        let got: Vec<&str> = table.entries.iter().map(|(_, r)| &*r.id).collect();
        assert_eq!(got, ["new", "old"]);
    }

    #[test]
    fn grpc_match_kinds_and_precedence() {
        let table = grpc_table(&[
            "{}",
            "{method: {service: shop.Catalog}}",
            "{method: {service: shop.Catalog, method: List}}",
            "{method: {method: List}}",
            "{method: {service: shop.Catalog, method: List}, headers: [{name: x-tier, value: gold}]}",
            "{method: {type: RegularExpression, service: 'shop\\..*'}}",
            "{method: {type: RegularExpression, service: 'shop\\.Catalog', method: 'L.*'}}",
            "{headers: [{name: x-a, value: '1'}, {name: X-A, value: '2'}]}",
        ]);
        let cases: &[GrpcCase] = &[
            ("/shop.Catalog/List", &[("x-tier", "gold")], Some("4")),
            ("/shop.Catalog/List", &[("X-Tier", "silver")], Some("2")),
            ("/shop.Catalog/Get", &[], Some("1")),
            ("/other.Svc/List", &[], Some("3")),
            ("/shop.Other/Get", &[], Some("5")),
            // An exact service outranks a regular expression for it.
            ("/shop.Catalog/Lookup", &[], Some("1")),
            ("/x.Y/Z", &[("x-a", "1")], Some("7")),
            ("/x.Y/Z", &[("x-a", "2")], Some("0")),
            ("/x.Y/Z", &[], Some("0")),
            ("/nope", &[], None),
            ("nope", &[], None),
        ];
        for (path, hs, want) in cases {
            let got = table.select(path, &headers(hs)).map(|r| r.id.to_string());
            assert_eq!(got.as_deref(), *want, "{path} {hs:?}");
        }
        // Equal matches: age, then name, then rule order.
        let any = || compile_grpc_match(&Default::default()).unwrap();
        let table = GrpcRoutes::new(vec![
            (any(), rule("b#0"), order("ns/b", None, 0, 0)),
            (any(), rule("a#1"), order("ns/a", None, 1, 0)),
            (any(), rule("a#0"), order("ns/a", None, 0, 0)),
            (
                any(),
                rule("z"),
                order("ns/z", Some("2026-01-01T00:00:00Z"), 0, 0),
            ),
        ]);
        let got: Vec<&str> = table.entries.iter().map(|(_, r)| &*r.id).collect();
        assert_eq!(got, ["z", "a#0", "a#1", "b#0"]);
    }
}
