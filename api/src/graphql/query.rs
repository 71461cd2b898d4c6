use async_graphql::connection::Connection;
use async_graphql::{Context, ID, InputObject, Object};
use cloudtask_catalogue::{RunFilter, TaskFilter};
use cloudtask_core::task::TaskState;
use cloudtask_core::{Error, Result};

use super::types::{
    AuditEntryObj, ClusterObj, Dashboard, MemberObj, NotificationSettingsObj, RunObj, RunStatusGql,
    TaskObj, TaskStateGql, TenantObj, UserObj, connection, page_request, parse_id,
};
use super::{identity, state, tenant};
use crate::error::ApiResult;

pub struct QueryRoot;

/// Which tasks `tasks` lists: every field given must match.
#[derive(InputObject, Default)]
#[graphql(name = "TaskFilter")]
pub struct TaskFilterInput {
    pub cluster_id: Option<ID>,
    pub state: Option<TaskStateGql>,
    /// Case-sensitive substring of the name.
    pub name_contains: Option<String>,
}

impl TaskFilterInput {
    fn parse(self) -> Result<TaskFilter> {
        Ok(TaskFilter {
            cluster_id: self
                .cluster_id
                .as_ref()
                .map(|id| parse_id("filter.clusterId", id))
                .transpose()?,
            state: self.state.map(Into::into),
            name_contains: self.name_contains,
        })
    }
}

/// Which runs `runs` lists: every field given must match.
#[derive(InputObject, Default)]
#[graphql(name = "RunFilter")]
pub struct RunFilterInput {
    pub task_id: Option<ID>,
    pub status: Option<RunStatusGql>,
}

impl RunFilterInput {
    fn parse(self) -> Result<RunFilter> {
        Ok(RunFilter {
            task_id: self
                .task_id
                .as_ref()
                .map(|id| parse_id("filter.taskId", id))
                .transpose()?,
            status: self.status.map(Into::into),
        })
    }
}

#[Object(name = "Query")]
impl QueryRoot {
    /// The caller.
    async fn me(&self, ctx: &Context<'_>) -> ApiResult<UserObj> {
        let identity = identity(ctx)?;
        let user = state(ctx).catalogue.user(identity.user_id).await?;
        Ok(UserObj(user.ok_or_else(|| {
            Error::Unauthenticated("unknown user".into())
        })?))
    }

    /// Every tenant. Platform admins only.
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

    async fn clusters(&self, ctx: &Context<'_>) -> ApiResult<Vec<ClusterObj>> {
        Ok(tenant(ctx)
            .await?
            .clusters()
            .await?
            .into_iter()
            .map(ClusterObj)
            .collect())
    }

    /// A cluster of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn cluster(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<ClusterObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(ClusterObj(
            handle.cluster(parse_id("id", &id)?).await?,
        )))
    }

    async fn tasks(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<TaskFilterInput>,
    ) -> ApiResult<Connection<String, TaskObj>> {
        let request = page_request(first, after)?;
        let filter = filter.unwrap_or_default().parse()?;
        let page = tenant(ctx).await?.tasks(&filter, request).await?;
        Ok(connection(page, request, |t| t.id.into(), TaskObj::from))
    }

    /// A task of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<TaskObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(TaskObj::from(
            handle.task(parse_id("id", &id)?).await?,
        )))
    }

    /// Runs of the caller's tenant, newest first.
    async fn runs(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<RunFilterInput>,
    ) -> ApiResult<Connection<String, RunObj>> {
        let request = page_request(first, after)?;
        let filter = filter.unwrap_or_default().parse()?;
        let page = tenant(ctx).await?.runs(&filter, request).await?;
        Ok(connection(page, request, |r| r.id.into(), RunObj))
    }

    /// A run of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn run(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<RunObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(RunObj(handle.run(parse_id("id", &id)?).await?)))
    }

    /// The tenant's default recipients and webhook (its secret is never shown).
    async fn notification_settings(&self, ctx: &Context<'_>) -> ApiResult<NotificationSettingsObj> {
        Ok(NotificationSettingsObj(
            tenant(ctx).await?.notifications().await?,
        ))
    }

    async fn members(&self, ctx: &Context<'_>) -> ApiResult<Vec<MemberObj>> {
        Ok(tenant(ctx)
            .await?
            .members()
            .await?
            .into_iter()
            .map(MemberObj)
            .collect())
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

    /// Every mutation in the tenant, newest first. OWNER and ADMIN only.
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<Connection<String, AuditEntryObj>> {
        let request = page_request(first, after)?;
        let page = tenant(ctx).await?.audit_log(request).await?;
        Ok(connection(page, request, |a| a.id, AuditEntryObj))
    }
}
