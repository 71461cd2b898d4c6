//! The audit log: who did what to which object, written in the transaction of the change
//! itself. A tenant's admins read their tenant's entries; platform events (logins,
//! logouts, user creation) have no tenant or one.

use chrono::{DateTime, Utc};
use cloudtask_core::Result;
use cloudtask_core::ids::{TenantId, UserId};
use cloudtask_core::roles::Action;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use crate::entities::audit;
use crate::error::DbResult;
use crate::{Catalogue, Page, PageRequest, TenantHandle, now};

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: Uuid,
    pub tenant_id: Option<TenantId>,
    pub actor_id: Option<UserId>,
    pub actor: String,
    pub operation: String,
    pub object_type: String,
    pub object_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<audit::Model> for AuditEntry {
    fn from(m: audit::Model) -> Self {
        AuditEntry {
            id: m.id,
            tenant_id: m.tenant_id.map(Into::into),
            actor_id: m.actor_id.map(Into::into),
            actor: m.actor,
            operation: m.operation,
            object_type: m.object_type,
            object_id: m.object_id,
            created_at: m.created_at,
        }
    }
}

/// Writes an audit row inside the caller's transaction. No actor: the system.
pub(crate) async fn write_audit(
    conn: &impl ConnectionTrait,
    tenant_id: Option<TenantId>,
    actor: Option<(UserId, &str)>,
    operation: &str,
    object_type: &str,
    object_id: Option<String>,
) -> DbResult<()> {
    audit::Entity::insert(audit::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id.map(Into::into)),
        actor_id: Set(actor.map(|(id, _)| id.into())),
        actor: Set(actor
            .map(|(_, email)| email.to_owned())
            .unwrap_or_else(|| "system".into())),
        operation: Set(operation.into()),
        object_type: Set(object_type.into()),
        object_id: Set(object_id),
        created_at: Set(now()),
    })
    .exec(conn)
    .await?;
    Ok(())
}

impl Catalogue {
    /// An audit row for a platform-level event (logins, logouts).
    pub async fn record_audit(
        &self,
        tenant_id: Option<TenantId>,
        actor: UserId,
        operation: &str,
    ) -> Result<()> {
        let actor_text = actor.to_string();
        self.with_db(async |db| {
            let object = Some(actor_text.clone());
            write_audit(
                db,
                tenant_id,
                Some((actor, &actor_text)),
                operation,
                "user",
                object,
            )
            .await
        })
        .await
    }
}

impl TenantHandle {
    /// An audit row of this tenant, by the handle's user, in the caller's transaction.
    pub(crate) async fn audit(
        &self,
        conn: &impl ConnectionTrait,
        operation: &str,
        object_type: &str,
        object_id: impl ToString,
    ) -> DbResult<()> {
        let object_id = Some(object_id.to_string());
        let tenant = Some(self.tenant_id());
        write_audit(
            conn,
            tenant,
            Some(self.actor()),
            operation,
            object_type,
            object_id,
        )
        .await
    }

    /// The tenant's audit log, newest first.
    pub async fn audit_log(&self, request: PageRequest) -> Result<Page<AuditEntry>> {
        self.reading(Action::ReadAudit, async |txn| {
            let mut query = self.find::<audit::Entity>();
            if let Some(after) = request.after {
                query = query.filter(audit::Column::Id.lt(after));
            }
            let rows = query
                .order_by_desc(audit::Column::Id)
                .limit(request.limit())
                .all(txn)
                .await?;
            Ok(request.page(rows.into_iter().map(Into::into).collect()))
        })
        .await
    }
}
