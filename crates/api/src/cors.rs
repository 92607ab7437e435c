//! The `CORS` route filter (Gateway API `HTTPCORSFilter`, experimental since v1.2), and the
//! checks on it and on the other filters' host names and ports.

use serde::{Deserialize, Serialize};

/// Cross-origin resource sharing for a rule: the proxy answers preflight requests from allowed
/// origins itself and adds the `Access-Control-*` headers to actual responses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCorsFilter {
    /// Origins allowed, `scheme://host[:port]`; the host may start with `*.` (any number of
    /// labels) or be `*`; `*` alone allows every origin. Port 80 (http) or 443 (https) when
    /// omitted. Empty allows none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<String>,
    /// Whether responses allow credentials (`Access-Control-Allow-Credentials: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// Methods allowed (case-sensitive), or `*` for all; GET, HEAD and POST are always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Request headers allowed, or `*` for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read, or `*` for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer; 5 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
}

/// `Access-Control-Max-Age` when `maxAge` is omitted (the Gateway API default).
pub const DEFAULT_MAX_AGE: u32 = 5;

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl HttpCorsFilter {
    /// Problems as `(field under the filter's `cors`, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |f: String, m: String| out.push((f, m));
        for (name, list) in [
            ("allowOrigins", &self.allow_origins),
            ("allowMethods", &self.allow_methods),
            ("allowHeaders", &self.allow_headers),
        ] {
            if list.len() > 1 && list.iter().any(|v| v == "*") {
                bad(name.into(), "`*` cannot be listed with other values".into());
            }
        }
        for (i, o) in self.allow_origins.iter().enumerate() {
            if let Err(e) = origin_pattern(o) {
                bad(format!("allowOrigins[{i}]"), e);
            }
        }
        for (i, m) in self.allow_methods.iter().enumerate() {
            if m != "*" && !METHODS.contains(&m.as_str()) {
                bad(
                    format!("allowMethods[{i}]"),
                    format!("{m:?} is not an HTTP method or `*` (methods are upper case)"),
                );
            }
        }
        for (name, list) in [
            ("allowHeaders", &self.allow_headers),
            ("exposeHeaders", &self.expose_headers),
        ] {
            for (i, h) in list.iter().enumerate() {
                if h != "*" && !token(h) {
                    bad(
                        format!("{name}[{i}]"),
                        format!("{h:?} is not a valid header name"),
                    );
                }
            }
        }
        if self.max_age == Some(0) {
            bad("maxAge".into(), "must be at least 1 (seconds)".into());
        }
        out
    }
}

/// An allowed origin, parsed: scheme, host pattern and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPattern {
    /// `http` or `https`; `None` for the lone `*`, which allows every origin.
    pub scheme: Option<String>,
    /// Lower-case host; `*` for any host, `*.example.com` for any subdomain.
    pub host: String,
    /// The port, the scheme's own when the origin names none.
    pub port: u16,
}

/// Parses an `allowOrigins` entry (the Gateway API's `CORSOrigin` form).
pub fn origin_pattern(text: &str) -> Result<OriginPattern, String> {
    if text == "*" {
        return Ok(OriginPattern {
            scheme: None,
            host: "*".into(),
            port: 0,
        });
    }
    let why = || format!("{text:?} is not `*` or an origin `http(s)://host[:port]`");
    let (scheme, rest) = text.split_once("://").ok_or_else(why)?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(why()),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(why)?),
        None => (rest, default_port),
    };
    let labels = host.strip_prefix("*.").unwrap_or(host);
    let ok = host == "*"
        || (!labels.is_empty()
            && labels.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !ok {
        return Err(why());
    }
    Ok(OriginPattern {
        scheme: Some(scheme.into()),
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// An RFC 7230 token (header names).
fn token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks a Gateway API `PreciseHostname`: an RFC 1123 host name in lower case, at most 253
/// characters, with no port and no wildcard.
pub fn precise_hostname(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(());
    }
    let hint = if name.contains(':') {
        " (no port: a redirect's port is its own field)"
    } else if name.contains('*') {
        " (no wildcard)"
    } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
        " (lower case)"
    } else {
        ""
    };
    Err(format!(
        "{name:?} is not a valid host name: RFC 1123 labels of letters, digits and '-' separated by '.'{hint}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_precise() {
        for ok in ["example.org", "a", "a-b.c0", "x.example.com"] {
            assert!(precise_hostname(ok).is_ok(), "{ok}");
        }
        for (bad, hint) in [
            ("", ""),
            ("example.org:8080", "no port"),
            ("*.example.org", "no wildcard"),
            ("Example.org", "lower case"),
            ("-a.org", ""),
            ("a..org", ""),
            ("a_b.org", ""),
            ("a.org.", ""),
            ("http://a.org", ""),
        ] {
            let e = precise_hostname(bad).expect_err(bad);
            assert!(e.contains(hint), "{bad}: {e}");
        }
        assert!(precise_hostname(&"a".repeat(64)).is_err());
        assert!(precise_hostname(&["a"; 127].join(".")).is_ok());
        assert!(precise_hostname(&["a"; 128].join(".")).is_err());
    }

    #[test]
    fn origins_parse_with_default_ports() {
        let p = |s| origin_pattern(s).unwrap();
        assert_eq!(p("https://www.foo.com").port, 443);
        assert_eq!(p("http://foo.com").port, 80);
        assert_eq!(p("https://*.bar.com:8443").host, "*.bar.com");
        assert_eq!(p("https://*.bar.com:8443").port, 8443);
        assert_eq!(p("https://*").host, "*");
        assert_eq!(p("*").scheme, None);
        for bad in [
            "ftp://a.com",
            "https://",
            "https://a.com:0",
            "https://a.com:x",
            "https://a.*.com",
            "a.com",
            "https://a.com/path",
        ] {
            assert!(origin_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cors_problems_name_the_field() {
        let f = HttpCorsFilter {
            allow_origins: vec!["*".into(), "https://a.com".into()],
            allow_methods: vec!["get".into()],
            allow_headers: vec!["x a".into()],
            expose_headers: vec!["ok".into()],
            max_age: Some(0),
            ..Default::default()
        };
        let fields: Vec<String> = f.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "allowOrigins",
                "allowMethods[0]",
                "allowHeaders[0]",
                "maxAge"
            ]
        );
        let good = HttpCorsFilter {
            allow_origins: vec!["https://*.a.com".into(), "http://b.com:8080".into()],
            allow_methods: vec!["*".into()],
            allow_headers: vec!["x-a".into()],
            expose_headers: vec!["*".into()],
            allow_credentials: Some(true),
            max_age: Some(600),
        };
        assert!(good.problems().is_empty());
    }
}
