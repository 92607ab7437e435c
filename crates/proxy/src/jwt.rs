//! Request authentication with JSON Web Tokens at the inbound sidecar: a pure check of the
//! `Authorization: Bearer` token against the issuers that apply, with the time passed in.
//! JWKS come from a file (read when the config is built) or an `http://` URL (fetched in the
//! background and refreshed every five minutes).

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The keys of one issuer.
#[derive(Debug, Clone)]
pub enum Keys {
    /// Read once, from a file.
    Static(Arc<JwkSet>),
    /// Fetched from a URL; empty until the first fetch succeeds.
    Remote(Arc<ArcSwapOption<JwkSet>>),
}

impl Keys {
    fn get(&self) -> Option<Arc<JwkSet>> {
        match self {
            Keys::Static(k) => Some(k.clone()),
            Keys::Remote(k) => k.load_full(),
        }
    }
}

/// One accepted issuer, compiled.
#[derive(Debug)]
pub struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    skew: u64,
    keys: Keys,
}

/// What a listener verifies.
#[derive(Debug, Default)]
pub struct Authn {
    issuers: Vec<Issuer>,
    required: bool,
}

/// The result of checking a request.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// No token, and none is required.
    Anonymous,
    /// A valid token: its claims.
    Valid(Map<String, Value>),
    /// No token where one is required, or an invalid token: why.
    Refused(String),
}

impl Authn {
    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Checks the request's bearer token at `now` (Unix seconds).
    pub fn check(&self, headers: &http::HeaderMap, now: u64) -> Outcome {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(token) = token else {
            return if self.required {
                Outcome::Refused("a bearer token is required".into())
            } else {
                Outcome::Anonymous
            };
        };
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            // Includes `alg: none`, which the library does not even represent.
            Err(e) => return Outcome::Refused(format!("malformed token: {e}")),
        };
        let mut why = String::from("no issuer accepts the token");
        for i in &self.issuers {
            match i.verify(token, &header, now) {
                Ok(claims) => return Outcome::Valid(claims),
                Err(e) => why = e,
            }
        }
        Outcome::Refused(why)
    }
}

impl Issuer {
    fn verify(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        now: u64,
    ) -> Result<Map<String, Value>, String> {
        if !self.algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not allowed", header.alg));
        }
        let keys = self
            .keys
            .get()
            .ok_or_else(|| format!("the keys of {} are not available yet", self.issuer))?;
        let candidates: Vec<_> = match &header.kid {
            Some(kid) => keys.find(kid).into_iter().collect(),
            None => keys.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err("no key of the issuer matches the token's kid".into());
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = self.algorithms.clone();
        // Expiry and not-before are checked below against the given clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        let mut last = String::new();
        for jwk in candidates {
            let key = match DecodingKey::from_jwk(jwk) {
                Ok(k) => k,
                Err(e) => {
                    last = format!("unusable key: {e}");
                    continue;
                }
            };
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let at = |name: &str| claims.get(name).and_then(Value::as_u64);
                    match at("exp") {
                        None => return Err("the token has no exp".into()),
                        Some(exp) if now > exp + self.skew => {
                            return Err("the token has expired".into());
                        }
                        _ => {}
                    }
                    if let Some(nbf) = at("nbf")
                        && now + self.skew < nbf
                    {
                        return Err("the token is not valid yet".into());
                    }
                    return Ok(claims);
                }
                Err(e) => last = format!("invalid token: {e}"),
            }
        }
        Err(last)
    }
}

/// Fetched JWKS by URL, shared by snapshots so a reload does not refetch.
#[derive(Default)]
pub struct JwksCache(Mutex<HashMap<String, Arc<ArcSwapOption<JwkSet>>>>);

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwksCache")
    }
}

impl JwksCache {
    /// The keys at `url`, fetching them in the background (and every five minutes after)
    /// the first time the URL is asked for.
    pub fn remote(&self, url: &str) -> Arc<ArcSwapOption<JwkSet>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(url) {
            return k.clone();
        }
        let slot: Arc<ArcSwapOption<JwkSet>> = Arc::default();
        map.insert(url.to_string(), slot.clone());
        let (url, weak) = (url.to_string(), Arc::downgrade(&slot));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                loop {
                    let Some(slot) = weak.upgrade() else { return };
                    let wait = match fetch(&url).await {
                        Ok(set) => {
                            slot.store(Some(Arc::new(set)));
                            Duration::from_secs(300)
                        }
                        Err(e) => {
                            tracing::warn!(%url, error = %e, "cannot fetch JWKS; retrying");
                            Duration::from_secs(5)
                        }
                    };
                    drop(slot);
                    tokio::time::sleep(wait).await;
                }
            });
        }
        slot
    }
}

async fn fetch(url: &str) -> Result<JwkSet, String> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let uri = http::Uri::from_str(url).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
}

/// Compiles the `RequestAuthentication`s that apply (`required` if any requires a token).
pub fn compile(
    specs: &[&trellis_api::authn::RequestAuthenticationSpec],
    cache: &JwksCache,
) -> Result<Authn, String> {
    let mut out = Authn::default();
    for spec in specs {
        out.required |= spec.required;
        for r in &spec.jwt_rules {
            let keys = match (&r.jwks_file, &r.jwks_uri) {
                (Some(f), _) => {
                    let text =
                        std::fs::read_to_string(f).map_err(|e| format!("jwksFile {f}: {e}"))?;
                    Keys::Static(Arc::new(
                        serde_json::from_str(&text)
                            .map_err(|e| format!("jwksFile {f}: not a JWKS: {e}"))?,
                    ))
                }
                (None, Some(u)) => Keys::Remote(cache.remote(u)),
                (None, None) => return Err(format!("issuer {}: no keys", r.issuer)),
            };
            let algorithms = r
                .algorithms
                .iter()
                .map(|a| Algorithm::from_str(a).map_err(|_| format!("unknown algorithm {a}")))
                .collect::<Result<Vec<_>, _>>()?;
            out.issuers.push(Issuer {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                algorithms,
                skew: r.clock_skew.get().as_secs(),
                keys,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header, encode};

    struct Signer {
        key: EncodingKey,
        jwk: Value,
    }

    /// An ES256 key pair and its public JWK.
    fn signer(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Signer {
            key: EncodingKey::from_ec_der(&kp.serialize_der()),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
        }
    }

    fn token(s: &Signer, kid: &str, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &claims, &s.key).unwrap()
    }

    fn authn(keys: &Signer, required: bool, algorithms: Vec<Algorithm>) -> Authn {
        Authn {
            issuers: vec![Issuer {
                issuer: "https://auth.test".into(),
                audiences: vec!["catalog".into()],
                algorithms,
                skew: 30,
                keys: Keys::Static(Arc::new(
                    serde_json::from_value(serde_json::json!({"keys": [keys.jwk]})).unwrap(),
                )),
            }],
            required,
        }
    }

    fn bearer(t: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn token_table() {
        let now = 1_800_000_000u64;
        let good = signer("k1");
        let other = signer("k1");
        let a = authn(&good, true, vec![Algorithm::ES256]);
        let claims = |over: Value| {
            let mut c = serde_json::json!({"iss": "https://auth.test", "aud": "catalog", "sub": "alice", "exp": now + 600, "nbf": now - 10, "role": "admin"});
            for (k, v) in over.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let alg_none = {
            let b64 =
                |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
                b64(&claims(serde_json::json!({})))
            )
        };
        let cases: Vec<(&str, http::HeaderMap, &str)> = vec![
            (
                "valid",
                bearer(&token(&good, "k1", claims(serde_json::json!({})))),
                "valid",
            ),
            (
                "expired",
                bearer(&token(
                    &good,
                    "k1",
                    claims(serde_json::json!({"exp": now - 31})),
                )),
                "expired",
            ),
            (
                "expired within skew",
                bearer(&token(
                    &good,
                    "k1",
                    claims(serde_json::json!({"exp": now - 29})),
                )),
                "valid",
            ),
            (
                "not yet valid",
                bearer(&token(
                    &good,
                    "k1",
                    claims(serde_json::json!({"nbf": now + 31})),
                )),
                "not valid yet",
            ),
            (
                "wrong issuer",
                bearer(&token(
                    &good,
                    "k1",
                    claims(serde_json::json!({"iss": "https://evil.test"})),
                )),
                "InvalidIssuer",
            ),
            (
                "wrong audience",
                bearer(&token(
                    &good,
                    "k1",
                    claims(serde_json::json!({"aud": "payments"})),
                )),
                "InvalidAudience",
            ),
            (
                "bad signature",
                bearer(&token(&other, "k1", claims(serde_json::json!({})))),
                "InvalidSignature",
            ),
            ("alg none", bearer(&alg_none), "malformed token"),
            (
                "unknown kid",
                bearer(&token(&good, "k2", claims(serde_json::json!({})))),
                "kid",
            ),
            (
                "no exp",
                bearer(&token(&good, "k1", {
                    let mut c = claims(serde_json::json!({}));
                    c.as_object_mut().unwrap().remove("exp");
                    c
                })),
                "no exp",
            ),
            ("missing", http::HeaderMap::new(), "required"),
            ("garbage", bearer("not.a.token"), "malformed"),
        ];
        for (name, headers, want) in cases {
            let got = a.check(&headers, now);
            let text = match &got {
                Outcome::Valid(c) => {
                    assert_eq!(c["role"], "admin");
                    "valid".to_string()
                }
                Outcome::Refused(why) => why.clone(),
                Outcome::Anonymous => "anonymous".into(),
            };
            assert!(text.contains(want), "{name}: got {text:?}, want {want:?}");
        }
        // An algorithm outside the allow-list is refused even with a good signature.
        let rs_only = authn(&good, true, vec![Algorithm::RS256]);
        let got = rs_only.check(
            &bearer(&token(&good, "k1", claims(serde_json::json!({})))),
            now,
        );
        assert!(
            matches!(got, Outcome::Refused(ref w) if w.contains("not allowed")),
            "{got:?}"
        );
        // Not required: no token passes, without claims.
        let optional = authn(&good, false, vec![Algorithm::ES256]);
        assert_eq!(
            optional.check(&http::HeaderMap::new(), now),
            Outcome::Anonymous
        );
    }
}
