//! Settings for every app, read from the environment because that is how `trellis run`
//! configures an app, and validated here so the apps only see usable values.

use crate::DemoError;
use http::HeaderValue;
use http::uri::Uri;
use std::time::Duration;

/// Every setting of every app; each app reads the ones it needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) port: Option<u16>,
    pub(crate) version: HeaderValue,
    pub(crate) catalog_url: Option<String>,
    pub(crate) inventory_url: Option<String>,
    pub(crate) payment_url: Option<String>,
    /// `host:port` of an HTTP proxy that routes by Host.
    pub(crate) http_proxy: Option<String>,
    pub(crate) target_url: Option<String>,
    pub(crate) rate: f64,
    pub(crate) payment_failure_rate: f64,
    pub(crate) latency: Duration,
    /// Every request but `/healthz` answered with this status at once: an instance that is
    /// broken while its health check stays green, for rehearsing outlier detection.
    pub(crate) fail_status: Option<http::StatusCode>,
}

impl Config {
    pub fn from_env() -> Result<Config, DemoError> {
        Config::from_lookup(|var| std::env::var(var).ok())
    }

    /// Reads settings through `get`, so tests never touch the process environment. Empty
    /// values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, DemoError> {
        let get = |var: &str| get(var).filter(|v| !v.trim().is_empty());
        let url = |var| get(var).map(|v| base_url(var, v)).transpose();
        let version = get("DEMO_VERSION").unwrap_or_else(|| "v1".into());
        Ok(Config {
            port: setting(&get, "PORT", "expected a port number", |v| v.parse().ok())?,
            version: HeaderValue::from_str(&version).map_err(|_| DemoError::Invalid {
                var: "DEMO_VERSION",
                value: version.clone(),
                why: "must be usable as a header value",
            })?,
            catalog_url: url("CATALOG_URL")?,
            inventory_url: url("INVENTORY_URL")?,
            payment_url: url("PAYMENT_URL")?,
            http_proxy: get("HTTP_PROXY").map(proxy_authority).transpose()?,
            target_url: url("TARGET_URL")?,
            // Bounded so the tick interval stays between a nanosecond and a lifetime.
            rate: setting(&get, "RATE", "expected 0.01 to 100000 per second", |v| {
                v.parse().ok().filter(|r| (0.01..=100_000.0).contains(r))
            })?
            .unwrap_or(20.0),
            payment_failure_rate: setting(
                &get,
                "PAYMENT_FAILURE_RATE",
                "expected 0.0 to 1.0",
                |v| v.parse().ok().filter(|r| (0.0..=1.0).contains(r)),
            )?
            .unwrap_or(0.02),
            latency: setting(&get, "LATENCY_MS", "expected milliseconds", |v| {
                v.parse().ok()
            })?
            .map_or(Duration::ZERO, Duration::from_millis),
            fail_status: setting(
                &get,
                "FAIL_STATUS",
                "expected an HTTP status 400 to 599",
                |v| {
                    v.parse::<u16>()
                        .ok()
                        .filter(|s| (400..=599).contains(s))
                        .and_then(|s| http::StatusCode::from_u16(s).ok())
                },
            )?,
        })
    }

    /// The port a server app listens on, if `PORT` was set.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

/// Parses one optional setting; a value that does not parse names its variable.
fn setting<T>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    why: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, DemoError> {
    match get(var) {
        None => Ok(None),
        Some(value) => match parse(value.trim()) {
            Some(v) => Ok(Some(v)),
            None => Err(DemoError::Invalid { var, value, why }),
        },
    }
}

/// Validates an `http://host:port[/prefix]` base URL and drops its trailing slash, so paths
/// can be appended.
fn base_url(var: &'static str, value: String) -> Result<String, DemoError> {
    match value.parse::<Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(DemoError::Invalid {
            var,
            value,
            why: "expected an http:// URL",
        }),
    }
}

/// Accepts `http://host:port` or `host:port` and returns `host:port` to connect to.
fn proxy_authority(value: String) -> Result<String, DemoError> {
    let authority = value.parse::<Uri>().ok().and_then(|uri| {
        let ok_scheme = matches!(uri.scheme_str(), None | Some("http"));
        let a = uri.authority()?.clone();
        ok_scheme.then(|| format!("{}:{}", a.host(), a.port_u16().unwrap_or(80)))
    });
    authority.ok_or(DemoError::Invalid {
        var: "HTTP_PROXY",
        value,
        why: "expected http://host:port",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, DemoError> {
        Config::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let c = config(&[("RATE", ""), ("LATENCY_MS", " ")]).unwrap();
        assert_eq!(c.port(), None);
        assert_eq!(c.version, "v1");
        assert_eq!(c.rate, 20.0);
        assert_eq!(c.payment_failure_rate, 0.02);
        assert_eq!(c.latency, Duration::ZERO);
        assert_eq!(c.fail_status, None);
        assert!(c.catalog_url.is_none() && c.http_proxy.is_none());
    }

    #[test]
    fn settings_are_parsed() {
        let c = config(&[
            ("PORT", "8080"),
            ("DEMO_VERSION", "v2"),
            ("CATALOG_URL", "http://127.0.0.1:15001/"),
            ("HTTP_PROXY", "127.0.0.1:15001"),
            ("RATE", "2.5"),
            ("PAYMENT_FAILURE_RATE", "1"),
            ("LATENCY_MS", "30"),
            ("FAIL_STATUS", "500"),
        ])
        .unwrap();
        assert_eq!(c.port(), Some(8080));
        assert_eq!(c.version, "v2");
        assert_eq!(c.catalog_url.as_deref(), Some("http://127.0.0.1:15001"));
        assert_eq!(c.http_proxy.as_deref(), Some("127.0.0.1:15001"));
        assert_eq!(c.rate, 2.5);
        assert_eq!(c.payment_failure_rate, 1.0);
        assert_eq!(c.latency, Duration::from_millis(30));
        assert_eq!(c.fail_status, Some(http::StatusCode::INTERNAL_SERVER_ERROR));
        let c = config(&[("HTTP_PROXY", "http://localhost")]).unwrap();
        assert_eq!(c.http_proxy.as_deref(), Some("localhost:80"));
    }

    #[test]
    fn bad_settings_name_the_variable() {
        for (var, value) in [
            ("PORT", "70000"),
            ("RATE", "0"),
            ("RATE", "NaN"),
            ("RATE", "1e12"),
            ("PAYMENT_FAILURE_RATE", "1.5"),
            ("LATENCY_MS", "-1"),
            ("FAIL_STATUS", "200"),
            ("FAIL_STATUS", "600"),
            ("CATALOG_URL", "127.0.0.1:1"),
            ("TARGET_URL", "https://x"),
            ("HTTP_PROXY", "socks5://x:1"),
        ] {
            match config(&[(var, value)]) {
                Err(DemoError::Invalid { var: v, .. }) => assert_eq!(v, var),
                other => panic!("{var}={value}: {other:?}"),
            }
        }
    }
}
