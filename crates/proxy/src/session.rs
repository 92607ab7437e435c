//! Session persistence (`sessionPersistence` on a route rule): a request carrying a valid
//! session token goes to the backend and endpoint the token is bound to while that endpoint
//! is usable; any other request is balanced as usual, and its response hands out a token
//! bound to the endpoint that answered.
//!
//! A token is `hex(version | issued | used | tag | mac)`: times in milliseconds since this
//! proxy started, the endpoint's tag (a keyed hash of the rule, backend and endpoint, so it
//! reveals no address), and a MAC over the rest. Both hashes are HMAC-SHA256 under a key
//! derived from this proxy's random secret and the rule's id, so a token is valid only on the
//! rule that issued it, cannot be forged or have its times changed, and can only ever name
//! one of the rule's own endpoints (a tag is looked up among them, never decoded into an
//! address). Decoding and the choice are pure over the token, the rule and `now`.

use crate::endpoint::EndpointState;
use crate::route::Rule;
use crate::snapshot::Backend;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};
use rustls::crypto::tls13::{Hkdf, OkmBlock};
use std::sync::Arc;
use tokio::time::Instant;
use trellis_api::session::{SessionPersistence, SessionType};

const VERSION: u8 = 1;
const TAG: usize = 8;
const MAC: usize = 16;
/// version, issued, used, tag.
const SIGNED: usize = 1 + 8 + 8 + TAG;
const TOKEN: usize = SIGNED + MAC;

/// This proxy's secret for session tokens, and the instant token times count from. Random
/// per process: a restarted proxy no longer honours the tokens it handed out (their sessions
/// are balanced again and bound anew).
pub struct Key {
    secret: [u8; 32],
    epoch: Instant,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("session::Key(..)")
    }
}

impl Default for Key {
    fn default() -> Self {
        Key::new()
    }
}

impl Key {
    /// A fresh random key (the TLS provider's secure random source).
    pub fn new() -> Key {
        let mut secret = [0u8; 32];
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        if provider.secure_random.fill(&mut secret).is_err() {
            // Never seen in practice; a key of hashed process randomness still keeps tokens
            // unguessable enough to not name an address.
            for (i, chunk) in secret.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(
                    &crate::rand::mix(crate::rand::u64() ^ i as u64).to_le_bytes(),
                );
            }
        }
        Key {
            secret,
            epoch: Instant::now(),
        }
    }

    /// The key of one rule's tokens.
    fn for_rule(&self, rule: &str) -> [u8; 32] {
        let mut msg = b"trellis-session-rule\0".to_vec();
        msg.extend_from_slice(rule.as_bytes());
        hmac(&self.secret, &msg)
    }
}

/// HMAC-SHA256, through the TLS provider (no crypto crate of our own).
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let tag = hkdf().hmac_sign(&OkmBlock::new(key), msg);
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag.as_ref()[..32]);
    out
}

fn hkdf() -> &'static dyn Hkdf {
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .map(|s| s.hkdf_provider)
        .expect("a TLS 1.3 suite")
}

/// A rule's session persistence, compiled: its settings, key and every endpoint's tag.
#[derive(Debug)]
pub struct Persistence {
    /// Cookie name (case kept: cookie names are case-sensitive), or header name.
    name: String,
    /// The header, for `type: Header`.
    header: Option<HeaderName>,
    absolute: Option<u64>,
    idle: Option<u64>,
    permanent: bool,
    key: [u8; 32],
    epoch: Instant,
    /// Per rule backend, per balancer member (same order): the endpoint's tag.
    tags: Vec<Vec<[u8; TAG]>>,
    /// `trellis_sessions_total` of this rule, one per [`OUTCOMES`] entry.
    counts: Vec<prometheus_client::metrics::counter::Counter>,
}

/// What an answered request's token came to: none (`new`), its session went on
/// (`resumed`), its endpoint could not take it (`moved`), or it was `expired` or `invalid`.
pub const OUTCOMES: [&str; 5] = ["new", "resumed", "moved", "expired", "invalid"];

/// The [`OUTCOMES`] index of a request whose token said `lookup`, answered by `answered`.
fn outcome(lookup: Lookup, answered: Option<(usize, usize)>) -> usize {
    match lookup {
        Lookup::Absent => 0,
        Lookup::Bound(b) if answered == Some((b.backend, b.member)) => 1,
        Lookup::Bound(_) => 2,
        Lookup::Expired => 3,
        Lookup::Invalid => 4,
    }
}

/// What a request's token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No token.
    Absent,
    /// Not one this rule issued (forged, altered, from another rule or an earlier run of
    /// this proxy), or its endpoint is no longer the rule's.
    Invalid,
    /// Past `absoluteTimeout` or `idleTimeout`.
    Expired,
    /// A live session.
    Bound(Bound),
}

/// A live session: the rule backend and member its token names, and when it began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Index into the rule's backends.
    pub backend: usize,
    /// Index into that backend's balancer members.
    pub member: usize,
    /// When the session began (ms since the key's epoch).
    pub issued: u64,
}

/// A decoded token whose MAC holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token {
    issued: u64,
    used: u64,
    tag: [u8; TAG],
}

impl Persistence {
    /// Compiles `spec` for rule `id` sending to `backends`.
    pub fn new(
        key: &Key,
        metrics: &crate::metrics::Metrics,
        id: &Arc<str>,
        spec: &SessionPersistence,
        backends: &[&Backend],
    ) -> Persistence {
        let rule_key = key.for_rule(id);
        let name = spec.session_name.clone().unwrap_or_else(|| {
            // The Gateway API asks for a generated name, unique per rule.
            let h = crate::rand::hash_bytes(id.as_bytes()) as u32;
            format!("trellis-session-{h:08x}")
        });
        // Validation checked that the name is a token, so that this holds.
        let header = (spec.kind == SessionType::Header)
            .then(|| HeaderName::try_from(name.as_str()).ok())
            .flatten();
        let tags = backends
            .iter()
            .map(|b| {
                b.balancer
                    .members()
                    .iter()
                    .map(|m| tag(&rule_key, &b.name, &m.state))
                    .collect()
            })
            .collect();
        let ms = |d: Option<trellis_api::Duration>| d.map(|d| d.get().as_millis() as u64);
        Persistence {
            name,
            header,
            absolute: ms(spec.absolute_timeout),
            idle: ms(spec.idle_timeout),
            permanent: spec.permanent(),
            key: rule_key,
            epoch: key.epoch,
            tags,
            counts: OUTCOMES
                .iter()
                .map(|&outcome| {
                    let labels = crate::metrics::SessionLabels {
                        route: id.clone(),
                        outcome,
                    };
                    metrics.sessions.get_or_create(&labels).clone()
                })
                .collect(),
        }
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The request's token, as the rule reads it (a cookie or a header).
    fn token<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        match &self.header {
            Some(h) => headers.get(h)?.to_str().ok(),
            None => cookie(headers, &self.name),
        }
    }

    /// What the request's token says at `now`.
    pub fn lookup(&self, headers: &HeaderMap, now: Instant) -> Lookup {
        let Some(text) = self.token(headers) else {
            return Lookup::Absent;
        };
        let Some(t) = self.decode(text) else {
            return Lookup::Invalid;
        };
        let now = self.millis(now);
        if t.issued > t.used || t.used > now {
            return Lookup::Invalid;
        }
        if self.absolute.is_some_and(|a| now - t.issued >= a)
            || self.idle.is_some_and(|i| now - t.used > i)
        {
            return Lookup::Expired;
        }
        self.tags
            .iter()
            .enumerate()
            .find_map(|(b, members)| {
                let m = members.iter().position(|tag| *tag == t.tag)?;
                Some(Lookup::Bound(Bound {
                    backend: b,
                    member: m,
                    issued: t.issued,
                }))
            })
            .unwrap_or(Lookup::Invalid)
    }

    /// The token to hand out with a response from member `answered` (rule backend, member)
    /// at `now`, given what the request's token said: none while the session goes on as it
    /// was, a refreshed one when `idleTimeout` counts its use, a new one otherwise. `None`
    /// too when the answer came from outside the rule's backends (a fallback).
    fn next(
        &self,
        lookup: Lookup,
        answered: Option<(usize, usize)>,
        now: Instant,
    ) -> Option<Token> {
        let (b, m) = answered?;
        let tag = *self.tags.get(b)?.get(m)?;
        let now = self.millis(now);
        match lookup {
            Lookup::Bound(s) if (s.backend, s.member) == (b, m) => self.idle.map(|_| Token {
                issued: s.issued,
                used: now,
                tag,
            }),
            _ => Some(Token {
                issued: now,
                used: now,
                tag,
            }),
        }
    }

    /// The response header carrying `t`.
    fn header(&self, t: &Token, now: Instant) -> Option<(HeaderName, HeaderValue)> {
        let token = self.encode(t);
        match &self.header {
            Some(h) => Some((h.clone(), HeaderValue::try_from(token).ok()?)),
            None => {
                let mut v = format!("{}={token}; Path=/; HttpOnly", self.name);
                if self.permanent
                    && let Some(a) = self.absolute
                {
                    // What is left of the session, rounded up to whole seconds.
                    let left = a.saturating_sub(self.millis(now).saturating_sub(t.issued));
                    v.push_str(&format!("; Max-Age={}", left.div_ceil(1000).max(1)));
                }
                Some((SET_COOKIE, HeaderValue::try_from(v).ok()?))
            }
        }
    }

    fn encode(&self, t: &Token) -> String {
        let mut b = [0u8; TOKEN];
        b[0] = VERSION;
        b[1..9].copy_from_slice(&t.issued.to_be_bytes());
        b[9..17].copy_from_slice(&t.used.to_be_bytes());
        b[17..SIGNED].copy_from_slice(&t.tag);
        let mac = hmac(&self.key, &b[..SIGNED]);
        b[SIGNED..].copy_from_slice(&mac[..MAC]);
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn decode(&self, text: &str) -> Option<Token> {
        let text = text.as_bytes();
        if text.len() != TOKEN * 2 {
            return None;
        }
        let mut b = [0u8; TOKEN];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            b[i] = (hex(pair[0])? << 4) | hex(pair[1])?;
        }
        let mac = hmac(&self.key, &b[..SIGNED]);
        if b[0] != VERSION || !same(&mac[..MAC], &b[SIGNED..]) {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let mut tag = [0u8; TAG];
        tag.copy_from_slice(&b[17..SIGNED]);
        Some(Token {
            issued: u64_at(1),
            used: u64_at(9),
            tag,
        })
    }
}

/// An endpoint's tag on a rule: who it is, keyed, so that it names no address.
fn tag(rule_key: &[u8; 32], backend: &str, e: &EndpointState) -> [u8; TAG] {
    let msg = format!("endpoint\0{backend}\0{}\0{:?}", e.addr, e.identity);
    let h = hmac(rule_key, msg.as_bytes());
    let mut t = [0u8; TAG];
    t.copy_from_slice(&h[..TAG]);
    t
}

/// Compares in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 may split them).
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// One request's session: its rule and what its token said.
pub struct Sticky {
    rule: Arc<Rule>,
    persistence: Arc<Persistence>,
    /// What the request's token said.
    pub lookup: Lookup,
}

impl Sticky {
    /// The member a live session is bound to, on `backend` (the rule's backend it names).
    pub fn pin(&self) -> Option<(&Backend, usize)> {
        match self.lookup {
            Lookup::Bound(b) => Some((&*self.rule.backends.get(b.backend)?.backend, b.member)),
            _ => None,
        }
    }

    /// Adds the token for the endpoint that answered (on `backend`) to the response, when
    /// the session is new, moved or needs its use recorded.
    pub fn stamp(
        &self,
        backend: &Backend,
        endpoint: &Arc<EndpointState>,
        headers: &mut HeaderMap,
        now: Instant,
    ) {
        let answered = self
            .rule
            .backends
            .iter()
            .position(|wb| std::ptr::eq(&*wb.backend, backend))
            .and_then(|b| {
                let m = backend
                    .balancer
                    .members()
                    .iter()
                    .position(|m| Arc::ptr_eq(&m.state, endpoint))?;
                Some((b, m))
            });
        let p = &self.persistence;
        if let Some(c) = p.counts.get(outcome(self.lookup, answered)) {
            c.inc();
        }
        let Some((name, value)) = p
            .next(self.lookup, answered, now)
            .and_then(|t| p.header(&t, now))
        else {
            return;
        };
        if name == SET_COOKIE {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
}

/// Session persistence for a request to `fwd`'s rule: reads its token and, when it names a
/// live session on another of the rule's backends, sends the request there (a session
/// outweighs the rule's weights, even a weight of 0) while that backend has a usable
/// endpoint; otherwise the weighted choice stands and the session moves.
pub fn resume(
    fwd: &mut crate::decide::Forward,
    headers: &HeaderMap,
    now: Instant,
) -> Option<Sticky> {
    let rule = fwd.rule.as_ref()?;
    let persistence = rule.session.clone()?;
    let lookup = persistence.lookup(headers, now);
    if let Lookup::Bound(b) = lookup
        && fwd.backend_index != Some(b.backend)
        && let Some(wb) = rule.backends.get(b.backend)
        && wb.backend.balancer.usable(&[])
    {
        // As decide::route fills them for a chosen backend.
        fwd.timeout = rule.timeout.unwrap_or(wb.backend.request_timeout);
        fwd.retry = wb.retry.clone();
        fwd.stats = Some(wb.stats.clone());
        fwd.backend = wb.backend.clone();
        fwd.backend_index = Some(b.backend);
    }
    Some(Sticky {
        rule: rule.clone(),
        persistence,
        lookup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A persistence over two backends of two and one endpoints, without a snapshot.
    fn persistence(key: &Key, rule: &str, yaml: &str) -> Persistence {
        let spec: SessionPersistence = serde_saphyr::from_str(yaml).unwrap();
        let metrics = crate::metrics::Metrics::default();
        let mut p = Persistence::new(key, &metrics, &Arc::from(rule), &spec, &[]);
        let k = key.for_rule(rule);
        p.tags = vec![
            vec![raw_tag(&k, "a1"), raw_tag(&k, "a2")],
            vec![raw_tag(&k, "b1")],
        ];
        p
    }

    fn raw_tag(k: &[u8; 32], who: &str) -> [u8; TAG] {
        let mut t = [0u8; TAG];
        t.copy_from_slice(&hmac(k, who.as_bytes())[..TAG]);
        t
    }

    fn with(p: &Persistence, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        match &p.header {
            None => {
                h.append(COOKIE, HeaderValue::from_static("theme=dark"));
                h.append(
                    COOKIE,
                    HeaderValue::try_from(format!("other=1; {}={value}", p.name)).unwrap(),
                );
            }
            Some(name) => {
                h.insert(name.clone(), HeaderValue::try_from(value).unwrap());
            }
        }
        h
    }

    /// The token a response from `(b, m)` hands out, as the client would send it back.
    fn issued(p: &Persistence, lookup: Lookup, at: (usize, usize), now: Instant) -> Option<String> {
        let t = p.next(lookup, Some(at), now)?;
        let (_, v) = p.header(&t, now).unwrap();
        let v = v.to_str().unwrap().to_string();
        Some(match &p.header {
            Some(_) => v,
            None => v
                .split(';')
                .next()
                .unwrap()
                .split_once('=')
                .unwrap()
                .1
                .to_string(),
        })
    }

    fn bound(backend: usize, member: usize, issued: u64) -> Lookup {
        Lookup::Bound(Bound {
            backend,
            member,
            issued,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_round_trip_and_expire() {
        let key = Key::new();
        let s = Duration::from_secs;
        let p = persistence(&key, "ns/r/0", "{absoluteTimeout: 1h, idleTimeout: 10m}");
        let t0 = Instant::now();
        let token = issued(&p, Lookup::Absent, (1, 0), t0).unwrap();
        assert_eq!(token.len(), TOKEN * 2);
        // Reveals no address and nothing readable.
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        type Case = (&'static str, Duration, Lookup);
        let cases: &[Case] = &[
            ("at once", s(0), bound(1, 0, 0)),
            ("idle just under the limit", s(600), bound(1, 0, 0)),
            ("idle past the limit", s(601), Lookup::Expired),
        ];
        for (name, after, want) in cases {
            assert_eq!(p.lookup(&with(&p, &token), t0 + *after), *want, "{name}");
        }
        // Used every 9 minutes, it lives until the absolute timeout, not beyond.
        let mut token = token;
        let mut now = t0;
        for _ in 0..6 {
            now += s(540);
            let l = p.lookup(&with(&p, &token), now);
            assert_eq!(l, bound(1, 0, 0));
            // The same endpoint answered: refreshed for idleTimeout, same start.
            token = issued(&p, l, (1, 0), now).unwrap();
        }
        assert_eq!(p.lookup(&with(&p, &token), t0 + s(3599)), bound(1, 0, 0));
        assert_eq!(p.lookup(&with(&p, &token), t0 + s(3600)), Lookup::Expired);
    }

    #[tokio::test(start_paused = true)]
    async fn only_this_rules_untouched_tokens_count() {
        let key = Key::new();
        let p = persistence(&key, "ns/r/0", "{}");
        let now = Instant::now();
        let token = issued(&p, Lookup::Absent, (0, 1), now).unwrap();
        let flip = |i: usize| {
            let mut b = token.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).unwrap()
        };
        let other_rule = persistence(&key, "ns/r/1", "{}");
        let other_proxy = persistence(&Key::new(), "ns/r/0", "{}");
        let cases: Vec<(&str, String, &Persistence, Lookup)> = vec![
            ("valid", token.clone(), &p, bound(0, 1, 0)),
            ("version changed", flip(1), &p, Lookup::Invalid),
            ("issue time changed", flip(10), &p, Lookup::Invalid),
            ("tag changed", flip(40), &p, Lookup::Invalid),
            ("mac changed", flip(80), &p, Lookup::Invalid),
            ("too short", token[..80].to_string(), &p, Lookup::Invalid),
            (
                "not hex",
                format!("{}zz", &token[..80]),
                &p,
                Lookup::Invalid,
            ),
            ("empty", String::new(), &p, Lookup::Invalid),
            (
                "another rule's",
                token.clone(),
                &other_rule,
                Lookup::Invalid,
            ),
            (
                "another proxy's",
                token.clone(),
                &other_proxy,
                Lookup::Invalid,
            ),
        ];
        for (name, text, p, want) in cases {
            assert_eq!(p.lookup(&with(p, &text), now), want, "{name}");
        }
        assert_eq!(p.lookup(&HeaderMap::new(), now), Lookup::Absent);
        // A valid token whose endpoint left the rule.
        let mut gone = persistence(&key, "ns/r/0", "{}");
        gone.tags[0].pop();
        assert_eq!(gone.lookup(&with(&gone, &token), now), Lookup::Invalid);
    }

    #[tokio::test(start_paused = true)]
    async fn the_choice_of_token_to_hand_out() {
        let key = Key::new();
        let plain = persistence(&key, "r", "{}");
        let idle = persistence(&key, "r", "{idleTimeout: 1m}");
        let now = Instant::now() + Duration::from_secs(5);
        let a2 = plain.tags[0][1];
        let b1 = plain.tags[1][0];
        type Want = Option<(u64, u64, [u8; TAG])>;
        type Case<'a> = (
            &'a str,
            &'a Persistence,
            Lookup,
            Option<(usize, usize)>,
            Want,
        );
        let cases: &[Case] = &[
            (
                "new session",
                &plain,
                Lookup::Absent,
                Some((0, 1)),
                Some((5000, 5000, a2)),
            ),
            (
                "expired: a new one",
                &plain,
                Lookup::Expired,
                Some((1, 0)),
                Some((5000, 5000, b1)),
            ),
            (
                "invalid: a new one",
                &plain,
                Lookup::Invalid,
                Some((1, 0)),
                Some((5000, 5000, b1)),
            ),
            (
                "kept: nothing to say",
                &plain,
                bound(0, 1, 100),
                Some((0, 1)),
                None,
            ),
            (
                "moved: bound anew",
                &plain,
                bound(0, 0, 100),
                Some((0, 1)),
                Some((5000, 5000, a2)),
            ),
            (
                "kept under idleTimeout: its use recorded",
                &idle,
                bound(1, 0, 100),
                Some((1, 0)),
                Some((100, 5000, b1)),
            ),
            (
                "a fallback answered: nothing",
                &plain,
                Lookup::Absent,
                None,
                None,
            ),
            (
                "unknown member: nothing",
                &plain,
                Lookup::Absent,
                Some((1, 3)),
                None,
            ),
        ];
        for (name, p, lookup, answered, want) in cases {
            let got = p
                .next(*lookup, *answered, now)
                .map(|t| (t.issued, t.used, t.tag));
            assert_eq!(got, *want, "{name}");
        }
        let counted: Vec<&str> = cases
            .iter()
            .map(|(_, _, lookup, answered, _)| OUTCOMES[outcome(*lookup, *answered)])
            .collect();
        assert_eq!(
            counted,
            [
                "new", "expired", "invalid", "resumed", "moved", "resumed", "new", "new"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cookies_and_headers_as_clients_see_them() {
        let key = Key::new();
        let now = Instant::now();
        let t = Token {
            issued: 0,
            used: 0,
            tag: [7; TAG],
        };
        let session = persistence(&key, "r", "{sessionName: sid}");
        let (n, v) = session.header(&t, now).unwrap();
        assert_eq!(n, SET_COOKIE);
        let v = v.to_str().unwrap();
        assert!(
            v.starts_with("sid=") && v.ends_with("; Path=/; HttpOnly"),
            "{v}"
        );
        // Permanent: Max-Age is what is left of absoluteTimeout.
        let permanent = persistence(
            &key,
            "r",
            "{sessionName: sid, absoluteTimeout: 1h, cookieConfig: {lifetimeType: Permanent}}",
        );
        let later = now + Duration::from_millis(600_500);
        let (_, v) = permanent.header(&t, later).unwrap();
        assert!(v.to_str().unwrap().ends_with("; Max-Age=3000"), "{v:?}");
        let header = persistence(&key, "r", "{type: Header, sessionName: x-session}");
        let (n, v) = header.header(&t, now).unwrap();
        assert_eq!(n, "x-session");
        assert_eq!(v.len(), TOKEN * 2);
        // Unnamed: a generated name, the same for the same rule.
        let a = persistence(&key, "ns/r/0", "{}");
        let b = persistence(&Key::new(), "ns/r/0", "{}");
        let c = persistence(&key, "ns/r/1", "{}");
        assert!(a.name.as_str().starts_with("trellis-session-"));
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
        // The cookie is found among others, in any Cookie header.
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1"));
        h.append(COOKIE, HeaderValue::from_static("b=2; sid=xyz ;c=3"));
        assert_eq!(cookie(&h, "sid"), Some("xyz"));
        assert_eq!(cookie(&h, "si"), None);
        assert_eq!(cookie(&h, "c"), Some("3"));
    }
}
