//! Users and their roles in tenants: `members`, `addMember`, `setMemberRole`,
//! `removeMember`, and the `User`, `Member` and `Membership` objects.

use async_graphql::{Context, Enum, ID, Object};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::{Member, Membership, User};
use cloudtask_core::Error;

use super::args::parse_id;
use super::inputs::AddMemberInput;
use super::tenants::TenantObj;
use super::{identity, state, tenant};
use crate::error::ApiResult;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "Role", remote = "cloudtask_core::roles::Role")]
pub enum RoleGql {
    Owner,
    Admin,
    Operator,
    Viewer,
}

#[derive(Default)]
pub struct MemberQuery;

#[Object]
impl MemberQuery {
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
    async fn members(&self, ctx: &Context<'_>) -> ApiResult<Vec<MemberObj>> {
        Ok(tenant(ctx)
            .await?
            .members()
            .await?
            .into_iter()
            .map(MemberObj)
            .collect())
    }
}

#[derive(Default)]
pub struct MemberMutation;

#[Object]
impl MemberMutation {
    async fn add_member(&self, ctx: &Context<'_>, input: AddMemberInput) -> ApiResult<MemberObj> {
        let handle = tenant(ctx).await?;
        let password_hash = match input.password {
            Some(password) => Some(
                state(ctx)
                    .passwords
                    .hash_new("password", password, &input.email)
                    .await?,
            ),
            None => None,
        };
        Ok(MemberObj(
            handle
                .add_member(&input.email, input.role.into(), password_hash)
                .await?,
        ))
    }

    async fn set_member_role(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        role: RoleGql,
    ) -> ApiResult<MemberObj> {
        let handle = tenant(ctx).await?;
        let user_id = parse_id("userId", &user_id)?;
        let member = handle.set_member_role(user_id, role.into()).await?;
        crate::sockets::account_changed(state(ctx), user_id);
        Ok(MemberObj(member))
    }

    // The member's open sockets close at once, on every replica.
    async fn remove_member(&self, ctx: &Context<'_>, user_id: ID) -> ApiResult<bool> {
        let user_id = parse_id("userId", &user_id)?;
        tenant(ctx).await?.remove_member(user_id).await?;
        crate::sockets::account_changed(state(ctx), user_id);
        Ok(true)
    }
}

pub struct UserObj(pub User);

#[Object(name = "User")]
impl UserObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn platform_admin(&self) -> bool {
        self.0.platform_admin
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// The user's tenants and roles. Only readable on yourself.
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
    async fn memberships(&self, ctx: &Context<'_>) -> ApiResult<Vec<MembershipObj>> {
        let me = identity(ctx)?;
        if me.user_id != self.0.id {
            return Err(
                Error::Forbidden("memberships are visible to their user only".into()).into(),
            );
        }
        Ok(state(ctx)
            .catalogue
            .memberships(me.user_id)
            .await?
            .into_iter()
            .map(MembershipObj)
            .collect())
    }
}

pub struct MembershipObj(pub Membership);

#[Object(name = "Membership")]
impl MembershipObj {
    async fn tenant(&self) -> TenantObj {
        TenantObj(self.0.tenant.clone())
    }
    async fn role(&self) -> RoleGql {
        self.0.role.into()
    }
}

pub struct MemberObj(pub Member);

#[Object(name = "Member")]
impl MemberObj {
    async fn user(&self) -> UserObj {
        UserObj(self.0.user.clone())
    }
    async fn role(&self) -> RoleGql {
        self.0.role.into()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}
