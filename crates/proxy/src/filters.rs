//! Compiled route filters and their pure effects on request and response heads.

use crate::snapshot::Backend;
use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use std::sync::Arc;

/// Header edits: set, add, remove.
#[derive(Debug, Default, Clone)]
pub struct HeaderEdit {
    /// Replace or insert.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Remove.
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    /// Applies the edits in the Gateway API's order: set, add, remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A path change.
#[derive(Debug, Clone)]
pub enum PathChange {
    /// Replace the whole path.
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

impl PathChange {
    /// The new path for `path`, whose first `prefix_len` bytes were matched by a prefix match.
    pub fn apply(&self, path: &str, prefix_len: usize) -> String {
        match self {
            PathChange::Full(p) => p.clone(),
            PathChange::Prefix(replacement) => {
                let rest = path.get(prefix_len..).unwrap_or("");
                let base = replacement.trim_end_matches('/');
                let out = if rest.is_empty() || rest.starts_with('/') {
                    format!("{base}{rest}")
                } else {
                    format!("{base}/{rest}")
                };
                if out.is_empty() { "/".into() } else { out }
            }
        }
    }
}

/// A redirect answer.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathChange>,
    /// New port.
    pub port: Option<u16>,
    /// Status code.
    pub status: StatusCode,
}

impl Redirect {
    /// The `Location` for a request to `host` (its `Host`, maybe with a port) and `uri`, whose
    /// service port is `listener_port`. The port in `host` plays no part: the Gateway API
    /// derives an unset port from the scheme or the listener (in the mesh, the Service port).
    pub fn location(&self, host: &str, uri: &Uri, prefix_len: usize, listener_port: u16) -> String {
        let scheme = self
            .scheme
            .clone()
            .unwrap_or_else(|| uri.scheme_str().unwrap_or("http").to_string());
        let host_only = host
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(host, |(h, _)| h);
        let hostname = self.hostname.as_deref().unwrap_or(host_only);
        // Gateway API: an explicit port wins; a set scheme implies its well-known port;
        // otherwise the listener's port. Well-known ports are left out.
        let port = self.port.unwrap_or(match self.scheme.as_deref() {
            Some("https") => 443,
            Some("http") => 80,
            _ => listener_port,
        });
        let well_known = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
        let path = match &self.path {
            Some(change) => change.apply(uri.path(), prefix_len),
            None => uri.path().to_string(),
        };
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        if well_known {
            format!("{scheme}://{hostname}{path}{query}")
        } else {
            format!("{scheme}://{hostname}:{port}{path}{query}")
        }
    }
}

/// A URL rewrite before forwarding.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// New host.
    pub hostname: Option<HeaderValue>,
    /// New path.
    pub path: Option<PathChange>,
}

/// A mirror target.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Where copies go.
    pub backend: Arc<Backend>,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

/// A rule's (or backend's) filters, compiled; read through `Deref` as a [`FilterSet`].
/// Every rule and rule backend has one, a mesh-wide view holds thousands, and most have no
/// filter at all: an empty set is one null pointer (it was 96 bytes, and 370 before the
/// filters in it were boxed).
#[derive(Debug, Default, Clone)]
pub struct Filters(Option<Box<FilterSet>>);

/// The filters of a rule or rule backend.
#[derive(Debug, Default, Clone)]
pub struct FilterSet {
    /// RequestHeaderModifier.
    pub request_headers: Option<Box<HeaderEdit>>,
    /// ResponseHeaderModifier.
    pub response_headers: Option<Box<HeaderEdit>>,
    /// RequestRedirect.
    pub redirect: Option<Box<Redirect>>,
    /// URLRewrite.
    pub rewrite: Option<Box<Rewrite>>,
    /// RequestMirror (several allowed).
    pub mirrors: Vec<Mirror>,
    /// RequestMirrors whose backend does not resolve: the backend they name
    /// (`namespace/name:port`) and their share in millionths. Nothing is sent; `http_mirror_backend_not_found` counts the copies.
    pub unresolved_mirrors: Vec<(Arc<str>, u32)>,
    /// ExtensionRef to a FaultInjection.
    pub fault: Option<Arc<crate::fault::Fault>>,
    /// CORS.
    pub cors: Option<Arc<crate::cors::Cors>>,
}

/// What an empty [`Filters`] reads as.
static NO_FILTERS: FilterSet = FilterSet {
    request_headers: None,
    response_headers: None,
    redirect: None,
    rewrite: None,
    mirrors: Vec::new(),
    unresolved_mirrors: Vec::new(),
    fault: None,
    cors: None,
};

impl std::ops::Deref for Filters {
    type Target = FilterSet;

    fn deref(&self) -> &FilterSet {
        self.0.as_deref().unwrap_or(&NO_FILTERS)
    }
}

impl From<FilterSet> for Filters {
    fn from(set: FilterSet) -> Filters {
        // Every field, by name: a field added later must be weighed here (or it would be
        // dropped from a rule that has only it).
        let FilterSet {
            request_headers,
            response_headers,
            redirect,
            rewrite,
            mirrors,
            unresolved_mirrors,
            fault,
            cors,
        } = &set;
        let empty = request_headers.is_none()
            && response_headers.is_none()
            && redirect.is_none()
            && rewrite.is_none()
            && mirrors.is_empty()
            && unresolved_mirrors.is_empty()
            && fault.is_none()
            && cors.is_none();
        Filters((!empty).then(|| Box::new(set)))
    }
}

/// Applies request-side filters (headers, rewrite) to a request head.
pub fn apply_request(filters: &Filters, parts: &mut http::request::Parts, prefix_len: usize) {
    if let Some(edit) = &filters.request_headers {
        edit.apply(&mut parts.headers);
    }
    if let Some(rw) = &filters.rewrite {
        if let Some(host) = &rw.hostname {
            parts.headers.insert(HOST, host.clone());
            if parts.uri.authority().is_some()
                && let Ok(a) = Authority::try_from(host.as_bytes())
            {
                let mut p = std::mem::take(&mut parts.uri).into_parts();
                p.authority = Some(a);
                parts.uri = Uri::from_parts(p).unwrap_or_default();
            }
        }
        if let Some(change) = &rw.path {
            let new_path = change.apply(parts.uri.path(), prefix_len);
            let pq = match parts.uri.query() {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                let mut p = std::mem::take(&mut parts.uri).into_parts();
                p.path_and_query = Some(pq);
                if p.scheme.is_none() && p.authority.is_some() {
                    p.scheme = Some(Scheme::HTTP);
                }
                parts.uri = Uri::from_parts(p).unwrap_or_default();
            }
        }
    }
}

/// A redirect response's `Location` header value, if the location is a valid header value.
pub fn location_header(location: &str) -> Option<(HeaderName, HeaderValue)> {
    HeaderValue::try_from(location).ok().map(|v| (LOCATION, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule or rule backend without filters (most of them) holds one null pointer.
    #[test]
    fn no_filters_is_one_null_pointer() {
        assert_eq!(size_of::<Filters>(), size_of::<usize>());
        let none = Filters::from(FilterSet::default());
        assert!(none.0.is_none());
        assert!(none.mirrors.is_empty() && none.redirect.is_none());
        let one = Filters::from(FilterSet {
            unresolved_mirrors: vec![("default/b:80".into(), 1)],
            ..FilterSet::default()
        });
        assert_eq!(one.unresolved_mirrors.len(), 1);
    }

    #[test]
    fn prefix_replacement_table() {
        // (matched prefix, replacement, path, expected) — mirrors the Gateway API conformance
        // cases for ReplacePrefixMatch.
        let cases = [
            ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
            ("/prefix/one", "/one", "/prefix/one", "/one"),
            ("/strip-prefix", "/", "/strip-prefix/three", "/three"),
            ("/strip-prefix", "/", "/strip-prefix", "/"),
            ("/strip-prefix", "/", "/strip-prefix/", "/"),
            ("/prefix", "/new/", "/prefix/x", "/new/x"),
            ("/prefix", "/new", "/prefix/", "/new/"),
            ("/", "/api", "/x/y", "/api/x/y"),
            // An empty replacement removes the prefix (the Gateway API's table).
            ("/foo", "", "/foo", "/"),
            ("/foo", "", "/foo/", "/"),
            ("/foo", "", "/foo/bar", "/bar"),
            ("/foo", "", "/foo/bar/", "/bar/"),
            ("/foo", "/", "/foo", "/"),
            ("/foo", "/", "/foo/", "/"),
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz", "/foo", "/xyz"),
            ("/foo", "/xyz", "/foo/", "/xyz/"),
        ];
        for (prefix, repl, path, want) in cases {
            let len = if prefix == "/" { 0 } else { prefix.len() };
            assert_eq!(
                PathChange::Prefix(repl.into()).apply(path, len),
                want,
                "{prefix} -> {repl} on {path}"
            );
        }
    }

    #[test]
    fn redirect_locations() {
        let r = |scheme: Option<&str>,
                 host: Option<&str>,
                 port: Option<u16>,
                 path: Option<PathChange>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: host.map(Into::into),
            path,
            port,
            status: StatusCode::FOUND,
        };
        let uri: Uri = "/a/b?x=1".parse().unwrap();
        // (redirect, Host header, service port, Location)
        let cases = [
            (
                r(Some("https"), None, None, None),
                "svc:8080",
                8080,
                "https://svc/a/b?x=1",
            ),
            (
                r(Some("http"), None, None, None),
                "svc:8080",
                8080,
                "http://svc/a/b?x=1",
            ),
            (
                r(None, Some("example.org"), None, None),
                "svc:8080",
                8080,
                "http://example.org:8080/a/b?x=1",
            ),
            (
                r(None, Some("example.org"), None, None),
                "svc",
                8080,
                "http://example.org:8080/a/b?x=1",
            ),
            // The port in Host is not the listener's: the service port is.
            (
                r(None, Some("example.org"), None, None),
                "svc:9999",
                8080,
                "http://example.org:8080/a/b?x=1",
            ),
            (
                r(None, None, None, None),
                "svc:9999",
                80,
                "http://svc/a/b?x=1",
            ),
            (
                r(None, None, Some(80), None),
                "svc:8080",
                8080,
                "http://svc/a/b?x=1",
            ),
            (
                r(Some("https"), None, Some(8443), None),
                "svc",
                8080,
                "https://svc:8443/a/b?x=1",
            ),
            (
                r(Some("https"), None, Some(443), None),
                "svc",
                8080,
                "https://svc/a/b?x=1",
            ),
            (
                r(Some("http"), None, Some(443), None),
                "svc",
                8080,
                "http://svc:443/a/b?x=1",
            ),
            (
                r(None, None, None, Some(PathChange::Full("/z".into()))),
                "svc:80",
                80,
                "http://svc/z?x=1",
            ),
            (
                r(None, None, None, Some(PathChange::Prefix("/new".into()))),
                "svc:80",
                80,
                "http://svc/new/b?x=1",
            ),
            (
                r(None, None, None, Some(PathChange::Prefix("".into()))),
                "[::1]:80",
                80,
                "http://[::1]/b?x=1",
            ),
        ];
        for (redirect, host, port, want) in cases {
            assert_eq!(
                redirect.location(host, &uri, 2, port),
                want,
                "{redirect:?} {host} {port}"
            );
        }
    }

    #[test]
    fn header_edit_order() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let edit = HeaderEdit {
            set: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("set"),
            )],
            add: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("added"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        edit.apply(&mut h);
        let vals: Vec<_> = h
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(vals, ["set", "added"]);
        assert!(!h.contains_key("x-gone"));
    }
}
