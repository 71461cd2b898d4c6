//! Signing in and out, and who the caller is: `me`, `login`, `refreshToken`, `logout`.
//! Tokens are issued by [`crate::auth::sessions`]; these resolvers shape its answers.

use async_graphql::{ComplexObject, Context, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::Tenant;
use cloudtask_core::Error;
use cloudtask_core::roles::Role;

use super::args::parse_optional_id;
use super::members::{RoleGql, UserObj};
use super::tenants::TenantObj;
use super::{identity, request, state};
use crate::auth::sessions::{self, Session};
use crate::error::ApiResult;

#[derive(Default)]
pub struct AuthQuery;

#[Object]
impl AuthQuery {
    /// The caller.
    async fn me(&self, ctx: &Context<'_>) -> ApiResult<UserObj> {
        let identity = identity(ctx)?;
        let user = state(ctx).catalogue.user(identity.user_id).await?;
        Ok(UserObj(user.ok_or_else(|| {
            Error::Unauthenticated("unknown user".into())
        })?))
    }
}

#[derive(Default)]
pub struct AuthMutation;

#[Object]
impl AuthMutation {
    /// Exchanges email and password for tokens. `tenantId` picks the tenant to act in;
    /// without it, the user's first tenant (or none, for a platform admin without one).
    async fn login(
        &self,
        ctx: &Context<'_>,
        email: String,
        password: String,
        tenant_id: Option<ID>,
    ) -> ApiResult<AuthPayload> {
        let tenant_id = parse_optional_id("tenantId", tenant_id.as_ref())?;
        let client_ip = request(ctx).client_ip;
        let session = sessions::login(state(ctx), client_ip, &email, password, tenant_id).await?;
        Ok(session.into())
    }

    /// Spends a refresh token for a new pair. Each refresh token works once; presenting a
    /// spent one revokes every token of that login.
    async fn refresh_token(
        &self,
        ctx: &Context<'_>,
        refresh_token: String,
    ) -> ApiResult<AuthPayload> {
        Ok(sessions::refresh(state(ctx), &refresh_token).await?.into())
    }

    /// Revokes the refresh token and every token rotated from the same login.
    async fn logout(&self, ctx: &Context<'_>, refresh_token: String) -> ApiResult<bool> {
        let caller = request(ctx)
            .auth
            .as_ref()
            .and_then(|auth| auth.as_ref().ok());
        Ok(sessions::logout(state(ctx), &refresh_token, caller).await?)
    }
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct AuthPayload {
    pub access_token: String,
    pub access_token_expires_at: DateTime<Utc>,
    /// Single use: each refresh returns a new one. Presenting a spent one revokes them all.
    pub refresh_token: String,
    pub user: UserObj,
    #[graphql(skip)]
    pub tenant_role: Option<(Tenant, Role)>,
}

#[ComplexObject]
impl AuthPayload {
    /// The tenant the access token acts in, if any.
    async fn tenant(&self) -> Option<TenantObj> {
        self.tenant_role.as_ref().map(|(t, _)| TenantObj(t.clone()))
    }
    async fn role(&self) -> Option<RoleGql> {
        self.tenant_role.as_ref().map(|(_, r)| (*r).into())
    }
}

impl From<Session> for AuthPayload {
    fn from(session: Session) -> Self {
        AuthPayload {
            access_token: session.access_token,
            access_token_expires_at: session.access_token_expires_at,
            refresh_token: session.refresh_token,
            user: UserObj(session.user),
            tenant_role: session.tenant_role,
        }
    }
}
