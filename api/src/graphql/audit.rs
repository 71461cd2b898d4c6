//! The tenant's audit log: every mutation, newest first.

use async_graphql::connection::Connection;
use async_graphql::{Context, ID, Object};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::AuditEntry;

use super::args::{connection, page_request};
use super::tenant;
use crate::error::ApiResult;

#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// Every mutation in the tenant, newest first. OWNER and ADMIN only.
    #[graphql(complexity = "super::cost::list(first, super::args::DEFAULT_PAGE, child_complexity)")]
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

pub struct AuditEntryObj(pub AuditEntry);

#[Object(name = "AuditEntry")]
impl AuditEntryObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    /// The mutation, e.g. `createTask`.
    async fn operation(&self) -> &str {
        &self.0.operation
    }
    async fn object_type(&self) -> &str {
        &self.0.object_type
    }
    async fn object_id(&self) -> Option<&str> {
        self.0.object_id.as_deref()
    }
    async fn actor_id(&self) -> Option<ID> {
        self.0.actor_id.map(|u| ID(u.to_string()))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}
