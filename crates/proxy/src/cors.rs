//! The CORS filter, compiled, and its pure decision over a request's head: a preflight from an
//! allowed origin is answered by the proxy; an actual request from one gets the
//! `Access-Control-*` response headers; anything else passes untouched.

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use trellis_api::cors::{DEFAULT_MAX_AGE, HttpCorsFilter, OriginPattern, origin_pattern};

/// A configured list: nothing, everything (`*`), or these values joined by `, `.
#[derive(Debug, Clone)]
enum List {
    Empty,
    Any,
    Some(HeaderValue),
}

impl List {
    fn of(values: &[String]) -> Result<List, String> {
        match values {
            [] => Ok(List::Empty),
            [one] if one == "*" => Ok(List::Any),
            _ => HeaderValue::try_from(values.join(", "))
                .map(List::Some)
                .map_err(|e| e.to_string()),
        }
    }
}

/// A rule's CORS policy, compiled.
#[derive(Debug, Clone)]
pub struct Cors {
    /// `None`: every origin.
    origins: Option<Vec<OriginPattern>>,
    credentials: bool,
    methods: List,
    headers: List,
    expose: List,
    max_age: HeaderValue,
}

/// What the CORS filter does with a request.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Not a cross-origin request, or an actual one from an origin not allowed: nothing added.
    Pass,
    /// A preflight: the proxy answers it with these headers, without forwarding. A preflight
    /// from an origin not allowed gets none of the `Access-Control-*` headers, so the
    /// browser refuses the cross-origin request.
    Preflight(HeaderMap),
    /// An actual request from an allowed origin (this `Origin`): its response gets the
    /// headers [`Cors::apply`] adds.
    Actual(HeaderValue),
}

const ACAO: HeaderName = header::ACCESS_CONTROL_ALLOW_ORIGIN;
const ACAC: HeaderName = header::ACCESS_CONTROL_ALLOW_CREDENTIALS;
const ACAM: HeaderName = header::ACCESS_CONTROL_ALLOW_METHODS;
const ACAH: HeaderName = header::ACCESS_CONTROL_ALLOW_HEADERS;
const ACEH: HeaderName = header::ACCESS_CONTROL_EXPOSE_HEADERS;
const ACMA: HeaderName = header::ACCESS_CONTROL_MAX_AGE;

/// Response headers scripts may always read (Fetch standard), never listed again.
const SAFELISTED: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::PRAGMA,
];

impl Cors {
    /// Compiles a validated filter.
    pub fn compile(f: &HttpCorsFilter) -> Result<Cors, String> {
        let origins = if f.allow_origins.iter().any(|o| o == "*") {
            None
        } else {
            Some(
                f.allow_origins
                    .iter()
                    .map(|o| origin_pattern(o))
                    .collect::<Result<_, _>>()?,
            )
        };
        Ok(Cors {
            origins,
            credentials: f.allow_credentials == Some(true),
            methods: List::of(&f.allow_methods)?,
            headers: List::of(&f.allow_headers)?,
            expose: List::of(&f.expose_headers)?,
            max_age: HeaderValue::from(f.max_age.unwrap_or(DEFAULT_MAX_AGE)),
        })
    }

    /// Whether `origin` (an `Origin` header value) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let Some(patterns) = &self.origins else {
            return true;
        };
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        let default = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return false,
            },
            _ => (rest, default),
        };
        let host = host.to_ascii_lowercase();
        patterns.iter().any(|p| {
            p.scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                && p.port == port
                && match p.host.strip_prefix('*') {
                    // `*`, or `*.suffix`: one or more labels before the suffix.
                    Some("") => true,
                    Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
                    None => p.host == host,
                }
        })
    }

    /// The decision for a request with `method` and `headers`.
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> Answer {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Answer::Pass;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let requested = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD);
        if *method == Method::OPTIONS
            && let Some(requested) = requested
        {
            let mut out = HeaderMap::new();
            if allowed {
                self.allow_origin(origin, &mut out);
                if let Some(v) = self.list(&self.methods, Some(requested)) {
                    out.insert(ACAM, v);
                }
                let asked = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
                if let Some(v) = self.list(&self.headers, asked) {
                    out.insert(ACAH, v);
                }
                if let Some(v) = self.list(&self.expose, None) {
                    out.insert(ACEH, v);
                }
                out.insert(ACMA, self.max_age.clone());
            }
            return Answer::Preflight(out);
        }
        if allowed {
            Answer::Actual(origin.clone())
        } else {
            Answer::Pass
        }
    }

    /// Adds the headers of an actual response to a request from the allowed `origin`.
    pub fn apply(&self, origin: &HeaderValue, response: &mut HeaderMap) {
        let expose = match (&self.expose, self.credentials) {
            // With credentials `*` means a literal name, so the response's own are listed.
            (List::Any, true) => {
                let names: Vec<&str> = response
                    .keys()
                    .filter(|n| {
                        !SAFELISTED.contains(*n) && !n.as_str().starts_with("access-control-")
                    })
                    .map(HeaderName::as_str)
                    .collect();
                if names.is_empty() {
                    None
                } else {
                    HeaderValue::try_from(names.join(", ")).ok()
                }
            }
            (list, _) => self.list(list, None),
        };
        if let Some(v) = expose {
            response.insert(ACEH, v);
        }
        self.allow_origin(origin, response);
    }

    fn allow_origin(&self, origin: &HeaderValue, out: &mut HeaderMap) {
        if self.origins.is_none() && !self.credentials {
            out.insert(ACAO, HeaderValue::from_static("*"));
        } else {
            // The answer depends on the request's Origin: caches must key on it.
            out.insert(ACAO, origin.clone());
            out.append(header::VARY, HeaderValue::from_static("origin"));
        }
        if self.credentials {
            out.insert(ACAC, HeaderValue::from_static("true"));
        }
    }

    /// A list's header value. `*` stands for everything only without credentials; with them
    /// the request's own value (`echo`) is answered, or nothing.
    fn list(&self, list: &List, echo: Option<&HeaderValue>) -> Option<HeaderValue> {
        match list {
            List::Empty => None,
            List::Some(v) => Some(v.clone()),
            List::Any if !self.credentials => Some(HeaderValue::from_static("*")),
            List::Any => echo.cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], methods: &[&str], headers: &[&str], credentials: bool) -> Cors {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Cors::compile(&HttpCorsFilter {
            allow_origins: s(origins),
            allow_credentials: Some(credentials),
            allow_methods: s(methods),
            allow_headers: s(headers),
            expose_headers: s(&["x-header-3", "x-header-4"]),
            max_age: Some(3600),
        })
        .unwrap()
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::try_from(*n).unwrap(),
                    HeaderValue::try_from(*v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn origins_match_exactly_by_wildcard_and_by_default_port() {
        let c = cors(
            &[
                "https://www.foo.com",
                "https://*.bar.com",
                "http://local:8080",
            ],
            &[],
            &[],
            false,
        );
        for (origin, want) in [
            ("https://www.foo.com", true),
            ("https://www.foo.com:443", true),
            ("HTTPS://WWW.FOO.COM", true),
            ("https://www.foo.com:8443", false),
            ("http://www.foo.com", false),
            ("https://foo.com", false),
            ("https://www.bar.com", true),
            ("https://xpto.www.bar.com", true),
            ("https://bar.com", false),
            ("https://foobar.com", false),
            ("https://x.bar.com.evil", false),
            ("http://local:8080", true),
            ("http://local", false),
            ("null", false),
            ("https://www.foo.com:x", false),
        ] {
            assert_eq!(c.allows(origin), want, "{origin}");
        }
        let any = cors(&["*"], &[], &[], false);
        assert!(any.allows("null") && any.allows("https://anything.example:1"));
        let any_https = cors(&["https://*"], &[], &[], false);
        assert!(any_https.allows("https://a.b.c"));
        assert!(!any_https.allows("http://a.b.c"));
    }

    /// (policy, method, request headers, expected answer headers or `None` for Pass /
    /// `Some(("actual", origin))`)
    #[test]
    fn decisions() {
        let listed = cors(
            &["https://www.foo.com", "https://*.bar.com"],
            &["GET", "OPTIONS"],
            &["x-header-1", "x-header-2"],
            true,
        );
        let wild_creds = cors(&["*"], &["*"], &["*"], true);
        let wild = cors(&["*"], &["*"], &["*"], false);
        let preflight = |origin: &str, method: &str, hdrs: Option<&str>| {
            let mut h = head(&[
                ("origin", origin),
                ("access-control-request-method", method),
            ]);
            if let Some(v) = hdrs {
                h.insert(
                    header::ACCESS_CONTROL_REQUEST_HEADERS,
                    HeaderValue::try_from(v).unwrap(),
                );
            }
            h
        };
        type Case<'a> = (&'a Cors, Method, HeaderMap, Answer);
        let cases: Vec<Case> = vec![
            // Preflight from a listed origin: every header, credentials, max age.
            (
                &listed,
                Method::OPTIONS,
                preflight("https://www.foo.com", "GET", Some("x-header-1")),
                Answer::Preflight(head(&[
                    ("access-control-allow-origin", "https://www.foo.com"),
                    ("vary", "origin"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-allow-methods", "GET, OPTIONS"),
                    ("access-control-allow-headers", "x-header-1, x-header-2"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                    ("access-control-max-age", "3600"),
                ])),
            ),
            // From a wildcard-matched origin: echoed.
            (
                &listed,
                Method::OPTIONS,
                preflight("https://xpto.www.bar.com", "GET", None),
                Answer::Preflight(head(&[
                    ("access-control-allow-origin", "https://xpto.www.bar.com"),
                    ("vary", "origin"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-allow-methods", "GET, OPTIONS"),
                    ("access-control-allow-headers", "x-header-1, x-header-2"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                    ("access-control-max-age", "3600"),
                ])),
            ),
            // From an origin not allowed: answered, with no CORS headers.
            (
                &listed,
                Method::OPTIONS,
                preflight("https://foobar.com", "GET", None),
                Answer::Preflight(HeaderMap::new()),
            ),
            // Wildcards with credentials: the request's own method and headers, never `*`.
            (
                &wild_creds,
                Method::OPTIONS,
                preflight(
                    "https://other.foo.com",
                    "PUT",
                    Some("x-header-1, x-header-2"),
                ),
                Answer::Preflight(head(&[
                    ("access-control-allow-origin", "https://other.foo.com"),
                    ("vary", "origin"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-allow-methods", "PUT"),
                    ("access-control-allow-headers", "x-header-1, x-header-2"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                    ("access-control-max-age", "3600"),
                ])),
            ),
            // Wildcards without credentials: `*`.
            (
                &wild,
                Method::OPTIONS,
                preflight("https://other.foo.com", "PUT", Some("x-header-1")),
                Answer::Preflight(head(&[
                    ("access-control-allow-origin", "*"),
                    ("access-control-allow-methods", "*"),
                    ("access-control-allow-headers", "*"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                    ("access-control-max-age", "3600"),
                ])),
            ),
            // Actual requests.
            (
                &listed,
                Method::GET,
                head(&[("origin", "https://www.bar.com")]),
                Answer::Actual(HeaderValue::from_static("https://www.bar.com")),
            ),
            (
                &listed,
                Method::GET,
                head(&[("origin", "https://foobar.com")]),
                Answer::Pass,
            ),
            // An OPTIONS without Access-Control-Request-Method is not a preflight.
            (
                &listed,
                Method::OPTIONS,
                head(&[("origin", "https://www.foo.com")]),
                Answer::Actual(HeaderValue::from_static("https://www.foo.com")),
            ),
            // No Origin: not cross-origin at all.
            (
                &wild,
                Method::OPTIONS,
                head(&[("access-control-request-method", "GET")]),
                Answer::Pass,
            ),
        ];
        for (i, (c, method, headers, want)) in cases.into_iter().enumerate() {
            assert_eq!(c.decide(&method, &headers), want, "case {i}");
        }
    }

    #[test]
    fn actual_responses_get_origin_credentials_and_exposed_headers() {
        let origin = HeaderValue::from_static("https://other.foo.com");
        let upstream = || head(&[("content-type", "text/plain"), ("x-custom", "1")]);
        // (policy, expected added headers)
        let cases = [
            (
                cors(&["*"], &[], &[], false),
                vec![
                    ("access-control-allow-origin", "*"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                ],
            ),
            (
                cors(&["https://*.foo.com"], &[], &[], true),
                vec![
                    ("access-control-allow-origin", "https://other.foo.com"),
                    ("vary", "origin"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-expose-headers", "x-header-3, x-header-4"),
                ],
            ),
        ];
        for (c, want) in cases {
            let mut got = upstream();
            c.apply(&origin, &mut got);
            let mut expected = upstream();
            for (n, v) in want {
                expected.append(
                    HeaderName::try_from(n).unwrap(),
                    HeaderValue::try_from(v).unwrap(),
                );
            }
            assert_eq!(got, expected);
        }
        // `*` exposed with credentials lists the response's own non-safelisted headers.
        let mut c = cors(&["*"], &[], &[], true);
        c.expose = List::Any;
        let mut got = upstream();
        c.apply(&origin, &mut got);
        assert_eq!(got[ACEH], "x-custom");
        assert_eq!(got[ACAO], "https://other.foo.com");
    }
}
