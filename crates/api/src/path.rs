//! One canonical request path (RFC 3986 §6.2.2), computed once before anything decides on
//! it, so that authorization, routing and the app all read the same path.
//!
//! - Percent-encoded unreserved characters (ALPHA, DIGIT, `-._~`) are decoded; every other
//!   percent-encoding stays, with uppercase hex.
//! - Bytes that may not appear raw in a path (`"<>\^`{|}`, non-ASCII) are percent-encoded,
//!   so each of them has one spelling.
//! - Dot segments are removed (§5.2.4), also when they were spelled `%2e`; `..` never climbs
//!   above the root.
//! - Repeated slashes are merged.
//! - Refused: an encoded slash (`%2F`) or backslash (`%5C`), a raw backslash, a control
//!   character raw or encoded (NUL included), bad percent-encoding, a path not starting
//!   with `/`. Servers disagree on whether these separate segments, so no answer is safe.

use std::borrow::Cow;

/// Why a path cannot be normalized. Positions are byte offsets into the path as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is not absolute.
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("invalid percent-encoding at byte {0}")]
    BadPercent(usize),
    /// `%2F`: a slash that some servers decode into a separator.
    #[error("encoded slash (%2F) at byte {0}")]
    EncodedSlash(usize),
    /// A backslash, raw or `%5C`: a separator to some servers.
    #[error("backslash at byte {0}")]
    Backslash(usize),
    /// A control character (0x00–0x1F, 0x7F), raw or percent-encoded.
    #[error("control character at byte {0}")]
    Control(usize),
}

/// The canonical form of `path` (the path alone, without the query). Borrows when the path
/// is canonical already, the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path)?;
    let out = remove_dot_segments(&decoded);
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Bytes that stand for themselves in a canonical path: unreserved, sub-delims, `:`, `@`
/// and `/` (RFC 3986 §3.3). `%` is not among them: an encoding needs a closer look.
fn is_raw_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// A quick check without allocating: only allowed raw bytes, no empty segment except a
/// trailing one, no dot segment.
fn is_canonical(path: &str) -> bool {
    if !path.bytes().all(is_raw_ok) {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if (s.is_empty() && !last) || s == "." || s == ".." {
            return false;
        }
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes unreserved characters, uppercases kept encodings, encodes raw bytes that need it,
/// and refuses what cannot be made safe.
fn decode(path: &str) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let encode = |out: &mut String, v: u8| {
        out.push('%');
        out.push(HEX[usize::from(v >> 4)] as char);
        out.push(HEX[usize::from(v & 15)] as char);
    };
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let v = match (
                    bytes.get(i + 1).and_then(|&h| hex(h)),
                    bytes.get(i + 2).and_then(|&l| hex(l)),
                ) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(PathError::BadPercent(i)),
                };
                match v {
                    b'/' => return Err(PathError::EncodedSlash(i)),
                    b'\\' => return Err(PathError::Backslash(i)),
                    0..0x20 | 0x7F => return Err(PathError::Control(i)),
                    v if is_unreserved(v) => out.push(v as char),
                    v => encode(&mut out, v),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash(i)),
            0..0x20 | 0x7F => return Err(PathError::Control(i)),
            b if is_raw_ok(b) => out.push(b as char),
            b => encode(&mut out, b),
        }
        i += 1;
    }
    Ok(out)
}

/// Removes `.` and `..` segments and empty segments (repeated slashes), keeping a trailing
/// slash where the path ends in a directory (`/a/`, `/a/.`, `/a/b/..`).
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut directory = false;
    for s in path[1..].split('/') {
        directory = true;
        match s {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => {
                kept.push(s);
                directory = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if directory || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_to_one_form() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/index.html", "/index.html"),
            ("/a/.well-known/x", "/a/.well-known/x"),
            ("/a/..b/c", "/a/..b/c"),
            // repeated slashes
            ("//admin/x", "/admin/x"),
            ("/a//b///c", "/a/b/c"),
            ("/a//", "/a/"),
            ("//", "/"),
            // dot segments
            ("/./admin/x", "/admin/x"),
            ("/x/../admin/x", "/admin/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/./b/../../c", "/c"),
            ("/../../admin", "/admin"),
            ("/..", "/"),
            ("/.", "/"),
            // unreserved characters decoded, also into dot segments
            ("/%61dmin/x", "/admin/x"),
            ("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~"),
            ("/%2e%2e/admin/x", "/admin/x"),
            ("/%2E/admin", "/admin"),
            ("/a/.%2e/admin", "/admin"),
            // other encodings stay, uppercased
            ("/a%3fb", "/a%3Fb"),
            ("/a%25b", "/a%25b"),
            ("/a%2541", "/a%2541"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            // raw bytes that may not appear in a path are encoded
            ("/a{b}", "/a%7Bb%7D"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a|b^c`d\"e<f>", "/a%7Cb%5Ec%60d%22e%3Cf%3E"),
            // sub-delims, ':' and '@' stand for themselves
            ("/a;b=c,d/e:f@g!$&'()*+", "/a;b=c,d/e:f@g!$&'()*+"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(*want), "{input:?}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/index.html", "/a%3Fb", "/a;b"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        assert!(matches!(normalize("//a"), Ok(Cow::Owned(_))));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("", NotAbsolute),
            ("admin", NotAbsolute),
            ("*", NotAbsolute),
            ("/a%2Fb", EncodedSlash(2)),
            ("/a%2fb", EncodedSlash(2)),
            ("/x/%2e%2e%2fadmin", EncodedSlash(9)),
            ("/a%5Cb", Backslash(2)),
            ("/a%5cb", Backslash(2)),
            ("/a\\b", Backslash(2)),
            ("/..\\admin", Backslash(3)),
            ("/a%00b", Control(2)),
            ("/a\0b", Control(2)),
            ("/a\tb", Control(2)),
            ("/a%0Ab", Control(2)),
            ("/a%7f", Control(2)),
            ("/a\u{7f}", Control(2)),
            ("/a%", BadPercent(2)),
            ("/a%4", BadPercent(2)),
            ("/a%zz", BadPercent(2)),
            ("/a%%41", BadPercent(2)),
            ("/a%-1", BadPercent(2)),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), Err(want.clone()), "{input:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Paths built from the pieces that matter (dots, slashes, encodings, backslashes,
        /// controls, non-ASCII), and arbitrary strings.
        fn paths() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("/"),
                Just("."),
                Just(".."),
                Just("a"),
                Just("admin"),
                Just("%2e"),
                Just("%2E"),
                Just("%2f"),
                Just("%5C"),
                Just("\\"),
                Just("%61"),
                Just("%7e"),
                Just("%25"),
                Just("%"),
                Just("%4"),
                Just("%c3%a9"),
                Just("\u{e9}"),
                Just("{"),
                Just(";"),
                Just("?"),
                Just("%00"),
                Just("\t"),
                Just("~"),
            ];
            prop_oneof![
                prop::collection::vec(piece, 0..16).prop_map(|v| format!("/{}", v.concat())),
                "/\\PC{0,40}",
                any::<String>(),
            ]
        }

        /// Decodes every percent-encoding, as an app would.
        fn decode_all(p: &str) -> Vec<u8> {
            let b = p.as_bytes();
            let (mut out, mut i) = (Vec::new(), 0);
            while i < b.len() {
                if b[i] == b'%' {
                    out.push(u8::from_str_radix(&p[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn normalized_paths_are_canonical_and_stay_under_the_root(p in paths()) {
                let Ok(n) = normalize(&p) else { return Ok(()) };
                prop_assert!(n.starts_with('/'), "{:?} -> {:?}", p, n);
                prop_assert_eq!(normalize(&n), Ok(Cow::Borrowed(&*n)), "not idempotent: {:?}", p);
                prop_assert!(!n.contains("//"), "{:?} -> {:?}", p, n);
                // What the app decodes has the same segments: no dot segment, no extra
                // separator, no backslash or control character.
                let decoded = decode_all(&n);
                prop_assert_eq!(
                    decoded.iter().filter(|&&b| b == b'/').count(),
                    n.matches('/').count()
                );
                prop_assert!(!decoded.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7F));
                for segment in decoded.split(|&b| b == b'/') {
                    prop_assert!(segment != b"." && segment != b"..", "{:?} -> {:?}", p, n);
                }
                // Below any root, it stays below that root.
                let jail = format!("/jail{n}");
                let jailed = normalize(&jail).unwrap();
                prop_assert!(jailed.starts_with("/jail/") || jailed == "/jail", "{:?}", jailed);
            }
        }
    }
}
