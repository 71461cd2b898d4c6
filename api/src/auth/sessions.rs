//! Users' sessions: login, refresh and logout. The only code that issues access and
//! refresh tokens; a refresh token works once, and each login is a family of them that
//! logout (or the reuse of a spent one) revokes whole.

use std::net::IpAddr;

use chrono::Utc;
use cloudtask_catalogue::RefreshOutcome;
use cloudtask_catalogue::{Tenant, User};
use cloudtask_core::ids::{TenantId, UserId};
use cloudtask_core::roles::Role;
use cloudtask_core::{Error, Result};
use uuid::Uuid;

use super::{Identity, random_token, token_hash};
use crate::AppState;

/// A fresh pair of tokens and whom they are for.
pub struct Session {
    pub access_token: String,
    pub access_token_expires_at: chrono::DateTime<Utc>,
    pub refresh_token: String,
    pub user: User,
    /// The tenant the access token acts in, and the user's role there.
    pub tenant_role: Option<(Tenant, Role)>,
}

/// Exchanges email and password for a session in `tenant_id`, or without it in the user's
/// first tenant (or none, for a platform admin without one). The attempt is counted by
/// the login limiter before the password is checked, and waits out its account's
/// slow-down first (see [`crate::limits`]).
pub async fn login(
    state: &AppState,
    client_ip: IpAddr,
    email: &str,
    password: String,
    tenant_id: Option<TenantId>,
) -> Result<Session> {
    let attempt = state.logins.start(email, client_ip)?;
    tokio::time::sleep(attempt.delay()).await;
    let credentials = match state.catalogue.user_credentials(email).await {
        Ok(credentials) => credentials,
        Err(e) => {
            attempt.unchecked();
            return Err(e);
        }
    };
    let hash = credentials.as_ref().map(|c| c.password_hash.clone());
    let verified = match state.passwords.verify(password, hash).await {
        Ok(verified) => verified,
        Err(e) => {
            attempt.unchecked();
            return Err(e);
        }
    };
    // A wrong password leaves the attempt counted as the failure it is.
    let Some(credentials) = credentials.filter(|_| verified) else {
        return Err(Error::Unauthenticated("invalid email or password".into()));
    };
    attempt.succeeded();
    let user_id = credentials.user.id;
    let memberships = state.catalogue.memberships(user_id).await?;
    let tenant_id = match tenant_id {
        Some(wanted) => {
            if !memberships.iter().any(|m| m.tenant.id == wanted) {
                return Err(Error::Forbidden("not a member of this tenant".into()));
            }
            Some(wanted)
        }
        None => memberships.first().map(|m| m.tenant.id),
    };
    let session = issue(state, user_id, tenant_id, Uuid::now_v7()).await?;
    state
        .catalogue
        .record_audit(tenant_id, user_id, "login")
        .await?;
    Ok(session)
}

/// Spends a refresh token for a new session of the same login. Presenting a spent one
/// revokes every token of that login.
pub async fn refresh(state: &AppState, refresh_token: &str) -> Result<Session> {
    match state
        .catalogue
        .spend_refresh_token(&token_hash(refresh_token))
        .await?
    {
        RefreshOutcome::Rotated {
            user_id,
            tenant_id,
            family,
        } => issue(state, user_id, tenant_id, family).await,
        RefreshOutcome::Invalid => Err(Error::Unauthenticated(
            "invalid or expired refresh token".into(),
        )),
        RefreshOutcome::Reused { user_id } => {
            login_revoked(state, user_id).await;
            Err(Error::Unauthenticated(
                "refresh token already used; this login is revoked".into(),
            ))
        }
    }
}

/// Revokes the refresh token and every token rotated from the same login; whether it was
/// known. The verified caller, if any, is recorded in the audit log.
pub async fn logout(
    state: &AppState,
    refresh_token: &str,
    caller: Option<&Identity>,
) -> Result<bool> {
    let revoked = state
        .catalogue
        .revoke_refresh_token(&token_hash(refresh_token))
        .await?;
    if let Some(user) = revoked {
        login_revoked(state, user).await;
    }
    if let Some(identity) = caller {
        state
            .catalogue
            .record_audit(identity.tenant_id, identity.user_id, "logout")
            .await?;
    }
    Ok(revoked.is_some())
}

/// A login of `user` was revoked: its access tokens are refused from now on here, and its
/// open sockets close, on every replica.
async fn login_revoked(state: &AppState, user: UserId) {
    if let Err(e) = state.revoked.learn(&state.catalogue, Some(user)).await {
        // The account event below still reaches every replica, this one included.
        tracing::warn!(error = %e, "reading the logins just revoked");
    }
    crate::sockets::account_changed(state, user);
}

/// Issues an access token and the next refresh token of `family`, with the membership
/// and role read now.
async fn issue(
    state: &AppState,
    user_id: UserId,
    tenant_id: Option<TenantId>,
    family: Uuid,
) -> Result<Session> {
    let user = state
        .catalogue
        .user(user_id)
        .await?
        .ok_or_else(|| Error::Unauthenticated("unknown user".into()))?;
    let tenant_role = match tenant_id {
        None => None,
        Some(tenant_id) => {
            let role = state
                .catalogue
                .role_in(user_id, tenant_id)
                .await?
                .ok_or_else(|| {
                    Error::Unauthenticated("no longer a member of this tenant".into())
                })?;
            let memberships = state.catalogue.memberships(user_id).await?;
            let tenant = memberships
                .into_iter()
                .find(|m| m.tenant.id == tenant_id)
                .map(|m| m.tenant)
                .ok_or(Error::NotFound("tenant"))?;
            Some((tenant, role))
        }
    };
    let access = state.keys.issue_access(
        user_id,
        tenant_role
            .as_ref()
            .map(|(tenant, role)| (tenant.id, *role)),
        user.platform_admin,
        Some(family),
    )?;
    let refresh_token = random_token("rt_");
    state
        .catalogue
        .insert_refresh_token(
            user_id,
            tenant_id,
            family,
            token_hash(&refresh_token),
            Utc::now() + chrono::Duration::seconds(state.config.refresh_token_ttl_secs as i64),
        )
        .await?;
    Ok(Session {
        access_token: access.token,
        access_token_expires_at: access.expires_at,
        refresh_token,
        user,
        tenant_role,
    })
}
