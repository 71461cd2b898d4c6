//! Tenants: the caller's tenant, every tenant and `createTenant` for platform admins, and
//! the tenant's dashboard counts.

use async_graphql::{Context, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::Tenant;
use cloudtask_core::Error;
use cloudtask_core::task::TaskState;

use super::inputs::CreateTenantInput;
use super::{identity, state, tenant};
use crate::error::ApiResult;

#[derive(Default)]
pub struct TenantQuery;

#[Object]
impl TenantQuery {
    /// Every tenant. Platform admins only.
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
    async fn tenants(&self, ctx: &Context<'_>) -> ApiResult<Vec<TenantObj>> {
        if !identity(ctx)?.platform_admin {
            return Err(Error::Forbidden("platform admins only".into()).into());
        }
        Ok(state(ctx)
            .catalogue
            .tenants()
            .await?
            .into_iter()
            .map(TenantObj)
            .collect())
    }

    /// The tenant the caller's token acts in.
    async fn tenant(&self, ctx: &Context<'_>) -> ApiResult<TenantObj> {
        Ok(TenantObj(tenant(ctx).await?.tenant().await?))
    }

    async fn dashboard(&self, ctx: &Context<'_>) -> ApiResult<Dashboard> {
        let handle = tenant(ctx).await?;
        Ok(Dashboard {
            cluster_count: handle.clusters().await?.len() as u64,
            task_count: handle.task_count(None).await?,
            active_task_count: handle.task_count(Some(TaskState::Active)).await?,
            paused_task_count: handle.task_count(Some(TaskState::Paused)).await?,
            member_count: handle.members().await?.len() as u64,
        })
    }
}

#[derive(Default)]
pub struct TenantMutation;

#[Object]
impl TenantMutation {
    /// Platform admins only.
    async fn create_tenant(
        &self,
        ctx: &Context<'_>,
        input: CreateTenantInput,
    ) -> ApiResult<TenantObj> {
        let identity = identity(ctx)?;
        if !identity.platform_admin {
            return Err(Error::Forbidden("platform admins only".into()).into());
        }
        let password_hash = match input.owner_password {
            Some(password) => Some(
                state(ctx)
                    .passwords
                    .hash_new("ownerPassword", password, &input.owner_email)
                    .await?,
            ),
            None => None,
        };
        let actor = identity.user_id.to_string();
        let tenant = state(ctx)
            .catalogue
            .create_tenant(
                (identity.user_id, &actor),
                &input.name,
                &input.owner_email,
                password_hash,
            )
            .await?;
        Ok(TenantObj(tenant))
    }
}

pub struct TenantObj(pub Tenant);

#[Object(name = "Tenant")]
impl TenantObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

#[derive(SimpleObject)]
pub struct Dashboard {
    pub cluster_count: u64,
    pub task_count: u64,
    pub active_task_count: u64,
    pub paused_task_count: u64,
    pub member_count: u64,
}
