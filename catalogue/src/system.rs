//! Reads and writes for the scheduler, a trusted system component that works across
//! tenants. Not reachable from GraphQL: the API only ever holds a `TenantHandle`.

use cloudtask_core::Result;
use cloudtask_core::ids::{ClusterId, TenantId};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait};
use serde_json::json;
use uuid::Uuid;

use crate::accounts::audit;
use crate::entities::{cluster, outbox, task};
use crate::records::{Cluster, Task};
use crate::{Catalogue, db_err, now};

/// A worker's membership changes the operators hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// Its session ended without a clean leave.
    Offline,
    /// It came back after being offline.
    Online,
}

impl WorkerEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerEvent::Offline => crate::notifications::WORKER_OFFLINE,
            WorkerEvent::Online => crate::notifications::WORKER_ONLINE,
        }
    }
}

impl Catalogue {
    /// Every cluster of every tenant.
    pub async fn all_clusters(&self) -> Result<Vec<Cluster>> {
        let rows = cluster::Entity::find()
            .order_by_asc(cluster::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub async fn cluster_by_id(&self, id: ClusterId) -> Result<Option<Cluster>> {
        let found = cluster::Entity::find_by_id(Uuid::from(id))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(found.map(Into::into))
    }

    /// Every task of a cluster, paused ones included.
    pub async fn tasks_of_cluster(&self, id: ClusterId) -> Result<Vec<Task>> {
        let rows = task::Entity::find()
            .filter(task::Column::ClusterId.eq(Uuid::from(id)))
            .order_by_asc(task::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// Records a worker event in the notification outbox and the audit log, in one
    /// transaction. `occurrence` tells repeated events apart (the session that ended, for
    /// instance); the same (cluster, worker, event, occurrence) is recorded once, so a new
    /// leader replaying what it saw does not notify twice.
    pub async fn record_worker_event(
        &self,
        tenant_id: TenantId,
        cluster_id: ClusterId,
        worker: &str,
        event: WorkerEvent,
        occurrence: &str,
    ) -> Result<bool> {
        let txn = self.db.begin().await.map_err(db_err)?;
        let cluster_name = cluster::Entity::find_by_id(Uuid::from(cluster_id))
            .one(&txn)
            .await
            .map_err(db_err)?
            .map(|c| c.name)
            .unwrap_or_default();
        let payload = json!({
            "cluster": cluster_id,
            "clusterName": cluster_name,
            "worker": worker,
            "at": now(),
        });
        let fresh = crate::notifications::enqueue(
            &txn,
            tenant_id,
            event.as_str(),
            &format!("{}:{cluster_id}:{worker}:{occurrence}", event.as_str()),
            payload,
            &[],
            None,
        )
        .await?;
        if fresh {
            let operation = match event {
                WorkerEvent::Offline => "workerOffline",
                WorkerEvent::Online => "workerOnline",
            };
            audit(
                &txn,
                Some(tenant_id),
                None,
                operation,
                "worker",
                Some(format!("{cluster_id}/{worker}")),
            )
            .await?;
        }
        txn.commit().await.map_err(db_err)?;
        Ok(fresh)
    }

    /// Whether the worker's latest membership event is an offline one.
    pub async fn worker_was_offline(
        &self,
        tenant_id: TenantId,
        cluster_id: ClusterId,
        worker: &str,
    ) -> Result<bool> {
        let latest = |event: WorkerEvent| {
            outbox::Entity::find()
                .filter(outbox::Column::TenantId.eq(Uuid::from(tenant_id)))
                .filter(
                    outbox::Column::DedupKey
                        .starts_with(format!("{}:{cluster_id}:{worker}:", event.as_str())),
                )
                .order_by_desc(outbox::Column::Id)
                .one(&self.db)
        };
        let offline = latest(WorkerEvent::Offline).await.map_err(db_err)?;
        let online = latest(WorkerEvent::Online).await.map_err(db_err)?;
        Ok(match (offline, online) {
            (Some(off), Some(on)) => off.id > on.id,
            (Some(_), None) => true,
            _ => false,
        })
    }

    /// Outbox rows of a kind, oldest first (for tests and the notifier).
    pub async fn outbox_kinds(
        &self,
        tenant_id: TenantId,
    ) -> Result<Vec<(String, serde_json::Value)>> {
        let rows = outbox::Entity::find()
            .filter(outbox::Column::TenantId.eq(Uuid::from(tenant_id)))
            .order_by_asc(outbox::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(|r| (r.kind, r.payload)).collect())
    }
}
