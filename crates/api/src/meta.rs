//! Object metadata shared by every kind.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The namespace used when a resource names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `metadata` of a resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Name, unique per kind within the namespace (lowercase letters, digits, `-`, `.`).
    pub name: String,
    /// Namespace; `default` when omitted.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 time the resource was first stored; orders route precedence ties (older wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Version of the stored resource, set by the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl Metadata {
    /// `creationTimestamp` as a time (`None` when unset), for route precedence: comparing the
    /// text would misorder offsets (`+01:00`) and fractional seconds.
    pub fn created(&self) -> Result<Option<jiff::Timestamp>, String> {
        self.creation_timestamp
            .as_deref()
            .map(parse_rfc3339)
            .transpose()
    }
}

/// Parses an RFC 3339 date-time (`2026-01-31T12:00:00Z`, `…T12:00:00.5+01:00`). Strict: the
/// wider ISO 8601 forms the time library also reads are refused.
pub fn parse_rfc3339(text: &str) -> Result<jiff::Timestamp, String> {
    let bad = || format!("{text:?} is not an RFC 3339 time (for example 2026-01-31T12:00:00Z)");
    let b = text.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, set: &[u8]| b.get(i).is_some_and(|c| set.contains(c));
    let shape = digits(0..4)
        && at(4, b"-")
        && digits(5..7)
        && at(7, b"-")
        && digits(8..10)
        && at(10, b"Tt")
        && digits(11..13)
        && at(13, b":")
        && digits(14..16)
        && at(16, b":")
        && digits(17..19);
    if !shape {
        return Err(bad());
    }
    let mut i = 19;
    if at(i, b".") {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(bad());
        }
        i += 1 + n;
    }
    let zone = match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && at(i + 3, b":") && digits(i + 4..i + 6)
        }
        _ => false,
    };
    if !zone {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Identifies one resource: kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    /// The kind, for example `HTTPRoute`.
    pub kind: String,
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Checks a DNS-1123 subdomain style name: lowercase alphanumerics, `-` and `.`, at most 253
/// characters, starting and ending with an alphanumeric.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253
        || !name.chars().all(ok_char)
        || !edge(name.chars().next())
        || !edge(name.chars().last())
    {
        return Err(format!(
            "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_strictly() {
        let secs = |t: &str| parse_rfc3339(t).map(|t| (t.as_second(), t.subsec_nanosecond()));
        let ok = [
            ("2026-01-31T12:00:00Z", (1_769_860_800, 0)),
            ("2026-01-31t12:00:00z", (1_769_860_800, 0)),
            ("2026-01-31T13:00:00+01:00", (1_769_860_800, 0)),
            ("2026-01-31T11:30:00-00:30", (1_769_860_800, 0)),
            ("2026-01-31T12:00:00.5Z", (1_769_860_800, 500_000_000)),
            ("2026-01-31T12:00:00.000000001Z", (1_769_860_800, 1)),
        ];
        for (text, want) in ok {
            assert_eq!(secs(text), Ok(want), "{text}");
        }
        let bad = [
            "",
            "2026-01-31",
            "2026-01-31 12:00:00Z",
            "2026-01-31T12:00Z",
            "2026-01-31T12:00:00",
            "2026-01-31T12:00:00.Z",
            "2026-01-31T12:00:00+0100",
            "2026-01-31T12:00:00+01:00x",
            "20260131T120000Z",
            "2026-13-31T12:00:00Z",
            "2026-02-30T12:00:00Z",
            "2026-01-31T25:00:00Z",
            "2026-01-31T12:00:00[UTC]",
        ];
        for text in bad {
            assert!(parse_rfc3339(text).is_err(), "{text} parsed");
        }
    }
}
