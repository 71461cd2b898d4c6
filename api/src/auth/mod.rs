//! Credentials: HS256 access tokens (algorithm pinned), opaque refresh tokens stored as
//! sha256, worker credentials scoped to one cluster. Passwords (argon2id, the rule for new
//! ones, bounded hashing) are in [`passwords`]; users' sessions (login, refresh, logout)
//! in [`sessions`].

mod passwords;
mod revoked;
pub mod sessions;

pub use passwords::{PasswordHashing, hash_password, validate_password, verify_password};
pub use revoked::RevokedLogins;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, SubsecRound, Utc};
use cloudtask_core::ids::{ClusterId, TenantId, UserId};
use cloudtask_core::roles::Role;
use cloudtask_core::{Error, Result};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only algorithm accepted. A token whose header names another (or `none`) is refused.
const ALGORITHM: Algorithm = Algorithm::HS256;
const AUDIENCE_USER: &str = "cloudtask-user";
const AUDIENCE_WORKER: &str = "cloudtask-worker";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cid: Option<String>,
    #[serde(default)]
    pa: bool,
    /// The role in `tid` when the token was issued. For the client to read: every request
    /// checks the role held now in the catalogue, so a change applies at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    /// The login (refresh-token family) the token was issued for: once it is revoked
    /// (logout, reuse), open sockets of the token close.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
}

/// A verified user.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: UserId,
    pub tenant_id: Option<TenantId>,
    pub platform_admin: bool,
    /// When the access token stops being valid (an open socket is closed then).
    pub expires_at: DateTime<Utc>,
    /// The login the token belongs to (its refresh-token family), when it has one.
    pub login: Option<uuid::Uuid>,
}

/// A verified worker: it may act for this one cluster only.
#[derive(Debug, Clone, Copy)]
pub struct WorkerIdentity {
    pub tenant_id: TenantId,
    pub cluster_id: ClusterId,
}

#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    access_ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("access_ttl", &self.access_ttl)
            .finish_non_exhaustive()
    }
}

pub struct IssuedAccess {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl TokenKeys {
    pub fn new(secret: &[u8], access_ttl: Duration) -> Self {
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            access_ttl,
        }
    }

    fn sign(&self, claims: &Claims) -> Result<String> {
        jsonwebtoken::encode(&Header::new(ALGORITHM), claims, &self.encoding)
            .map_err(|e| Error::internal(format!("signing a token: {e}")))
    }

    fn verify(&self, token: &str, audience: &str) -> Result<Claims> {
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    _ => "invalid token",
                };
                Error::Unauthenticated(why.into())
            })
    }

    /// An access token for `user_id`, acting in `tenant` (with the role held there now).
    pub fn issue_access(
        &self,
        user_id: UserId,
        tenant: Option<(TenantId, Role)>,
        platform_admin: bool,
        login: Option<uuid::Uuid>,
    ) -> Result<IssuedAccess> {
        let now = Utc::now();
        // In whole seconds, as `exp` says: the expiry reported is the one enforced.
        let expires_at = (now + self.access_ttl).trunc_subsecs(0);
        let token = self.sign(&Claims {
            sub: user_id.to_string(),
            aud: AUDIENCE_USER.into(),
            exp: expires_at.timestamp(),
            iat: now.timestamp(),
            tid: tenant.map(|(t, _)| t.to_string()),
            cid: None,
            pa: platform_admin,
            role: tenant.map(|(_, role)| role.as_str().to_owned()),
            sid: login.map(|l| l.to_string()),
        })?;
        Ok(IssuedAccess { token, expires_at })
    }

    pub fn verify_access(&self, token: &str) -> Result<Identity> {
        let claims = self.verify(token, AUDIENCE_USER)?;
        let bad = |_| Error::Unauthenticated("invalid token".into());
        Ok(Identity {
            user_id: claims.sub.parse().map_err(bad)?,
            tenant_id: claims.tid.map(|t| t.parse()).transpose().map_err(bad)?,
            platform_admin: claims.pa,
            expires_at: DateTime::from_timestamp(claims.exp, 0)
                .ok_or_else(|| Error::Unauthenticated("invalid token".into()))?,
            login: match claims.sid {
                Some(sid) => Some(
                    sid.parse::<uuid::Uuid>()
                        .map_err(|_| Error::Unauthenticated("invalid token".into()))?,
                ),
                None => None,
            },
        })
    }

    pub fn issue_worker(
        &self,
        tenant_id: TenantId,
        cluster_id: ClusterId,
        ttl: Duration,
    ) -> Result<IssuedAccess> {
        let now = Utc::now();
        let expires_at = now + ttl;
        let token = self.sign(&Claims {
            sub: cluster_id.to_string(),
            aud: AUDIENCE_WORKER.into(),
            exp: expires_at.timestamp(),
            iat: now.timestamp(),
            tid: Some(tenant_id.to_string()),
            cid: Some(cluster_id.to_string()),
            pa: false,
            role: None,
            sid: None,
        })?;
        Ok(IssuedAccess { token, expires_at })
    }

    pub fn verify_worker(&self, token: &str) -> Result<WorkerIdentity> {
        let claims = self.verify(token, AUDIENCE_WORKER)?;
        let bad = |_| Error::Unauthenticated("invalid token".into());
        Ok(WorkerIdentity {
            tenant_id: claims.tid.unwrap_or_default().parse().map_err(bad)?,
            cluster_id: claims.cid.unwrap_or_default().parse().map_err(bad)?,
        })
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// 32 random bytes, URL-safe: refresh tokens and cluster join tokens.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A new cluster join token, and the hash that is stored of it.
pub fn new_join_token() -> (String, String) {
    let token = random_token("ctj_");
    let hash = token_hash(&token);
    (token, hash)
}

/// How opaque tokens are stored: a fast hash suffices, they carry 256 bits of entropy.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(&[7u8; 32], Duration::minutes(5))
    }

    #[test]
    fn access_tokens_round_trip_and_workers_are_separate() {
        let user = UserId::new();
        let token = keys().issue_access(user, None, true, None).unwrap().token;
        let identity = keys().verify_access(&token).unwrap();
        assert_eq!(identity.user_id, user);
        assert!(identity.platform_admin);
        assert!(
            keys().verify_worker(&token).is_err(),
            "a user token is no worker credential"
        );
        let worker = keys().issue_worker(TenantId::new(), ClusterId::new(), Duration::hours(1));
        assert!(keys().verify_access(&worker.unwrap().token).is_err());
    }

    #[test]
    fn other_secret_is_refused() {
        let token = keys()
            .issue_access(UserId::new(), None, false, None)
            .unwrap()
            .token;
        let other = TokenKeys::new(&[8u8; 32], Duration::minutes(5));
        assert!(other.verify_access(&token).is_err());
    }
}
