//! Durations in the Gateway API format: `10s`, `500ms`, `1h30m` (GEP-2257).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A non-negative duration written as one to four `<number><unit>` parts, units `h`, `m`, `s`,
/// `ms` (for example `1h30m`, `250ms`). `0s` means "no limit" where a field says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Builds a duration from milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    /// Builds a duration from seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
    /// The standard-library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
    /// `None` for zero, which config uses to mean "disabled".
    pub fn non_zero(self) -> Option<std::time::Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Parses `1h30m`, `10s`, `250ms`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: expected parts like 10s, 500ms, 1h30m");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total_ms: u64 = 0;
    let mut parts = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 5 {
            return Err(bad());
        }
        let n: u64 = text[start..i].parse().map_err(|_| bad())?;
        let unit_ms = if text[i..].starts_with("ms") {
            i += 2;
            1
        } else {
            let u = match bytes.get(i) {
                Some(b'h') => 3_600_000,
                Some(b'm') => 60_000,
                Some(b's') => 1_000,
                _ => return Err(bad()),
            };
            i += 1;
            u
        };
        total_ms += n * unit_ms;
        parts += 1;
    }
    if parts > 4 {
        return Err(bad());
    }
    Ok(Duration::from_millis(total_ms))
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        for (v, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if v > 0 {
                write!(f, "{v}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, ms, printed) in [
            ("10s", 10_000, "10s"),
            ("500ms", 500, "500ms"),
            ("1h30m", 5_400_000, "1h30m"),
            ("1m1s1ms", 61_001, "1m1s1ms"),
            ("0s", 0, "0s"),
            ("90s", 90_000, "1m30s"),
        ] {
            let d = parse(text).unwrap();
            assert_eq!(d.0.as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), printed, "{text}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for text in [
            "",
            "10",
            "s",
            "1.5s",
            "10x",
            "-1s",
            "123456s",
            "1h1m1s1ms1ms",
            "1 s",
        ] {
            assert!(parse(text).is_err(), "{text} should be rejected");
        }
    }
}
