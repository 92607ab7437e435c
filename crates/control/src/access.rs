//! Who may do what on the config API: the admin token may do everything; a read-only token
//! (`trellis token create --read-only`, for the dashboard and people who only look) may read
//! everything under `/v1/` except token management, and ask for an explanation, which
//! changes nothing. Read-only tokens are stored as SHA-256 hashes on a lease that ends with
//! them, like join tokens.

use crate::Control;
use crate::identity::IdentityError;
use crate::store::{Expect, Op};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// Store key prefix of read-only tokens (followed by the token's hash).
pub const READER_PREFIX: &str = "readers/";

/// The longest a read-only token may live.
pub const MAX_READER_TTL: Duration = Duration::from_secs(366 * 86400);

/// A read-only token, as stored under its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reader {
    /// Expiry, Unix seconds.
    pub expires_at: u64,
}

/// What a bearer token proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The admin token.
    Admin,
    /// A live read-only token.
    ReadOnly,
}

/// Whether `access` may send `method` to `path`. Pure; the table below is the policy.
pub fn permits(access: Access, method: &http::Method, path: &str) -> bool {
    match access {
        Access::Admin => true,
        Access::ReadOnly => {
            // Token management reveals or mints credentials: admin only, even to read.
            let secret = path == "/v1/tokens" || path.starts_with("/v1/tokens/");
            let read = (method == http::Method::GET || method == http::Method::HEAD)
                && path.starts_with("/v1/");
            // An explanation evaluates a request against a view; it writes nothing.
            let explain = method == http::Method::POST && path == "/v1/explain";
            !secret && (read || explain)
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Control {
    /// What `token` grants, if anything: the admin token, or an unexpired read-only token.
    pub fn access_of(&self, token: &str) -> Option<Access> {
        if self.check_admin(token) {
            return Some(Access::Admin);
        }
        let hash = trellis_identity::token_hash(token);
        let state = self.state();
        let reader = state.readers.get(&hash)?;
        (reader.expires_at > unix(SystemTime::now())).then_some(Access::ReadOnly)
    }

    /// Creates a read-only token valid for `ttl`; returns it (shown once) and its expiry.
    pub async fn create_reader(&self, ttl: Duration) -> Result<(String, u64), IdentityError> {
        if ttl.is_zero() || ttl > MAX_READER_TTL {
            return Err(IdentityError::Invalid(
                "ttl must be between 1s and 366d".into(),
            ));
        }
        let token = trellis_identity::random_token()
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let expires_at = unix(SystemTime::now() + ttl);
        let lease = self
            .store
            .grant(ttl)
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let mut op = Op::put(
            format!("{READER_PREFIX}{}", trellis_identity::token_hash(&token)),
            serde_json::to_vec(&Reader { expires_at })
                .map_err(|e| IdentityError::Unavailable(e.to_string()))?,
            Expect::Absent,
        );
        op.lease = Some(lease);
        let rev = self
            .store
            .commit(vec![op])
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        self.wait_for(rev).await;
        tracing::info!(expires_at, "read-only token created");
        Ok((token, expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn read_only_tokens_read_and_explain_but_change_nothing() {
        let cases = [
            (Method::GET, "/v1/resources/httproutes", true),
            (Method::GET, "/v1/stats", true),
            (Method::GET, "/v1/tap", true),
            (Method::GET, "/v1/certificates", true),
            (Method::GET, "/v1/capacity", true),
            (Method::HEAD, "/v1/stats", true),
            (Method::POST, "/v1/explain", true),
            (Method::POST, "/v1/apply", false),
            (Method::POST, "/v1/delete", false),
            (Method::POST, "/v1/tokens", false),
            (Method::GET, "/v1/tokens", false),
            (Method::GET, "/v1/tokens/x", false),
            (Method::PUT, "/v1/resources/services/default/a", false),
            (Method::DELETE, "/v1/resources/services/default/a", false),
            (Method::POST, "/v1/explain/more", false),
            (Method::GET, "/mesh.Mesh/Config", false),
        ];
        for (method, path, want) in cases {
            assert_eq!(
                permits(Access::ReadOnly, &method, path),
                want,
                "{method} {path}"
            );
            assert!(
                permits(Access::Admin, &method, path),
                "admin {method} {path}"
            );
        }
    }
}
