//! Worker membership events the operators hear about (offline, back online), recorded
//! by the scheduler in the notification outbox and the audit log. The outbox rows are
//! also the membership history: whether a worker was last seen going offline.

use cloudtask_core::Result;
use cloudtask_core::ids::{ClusterId, TenantId, WorkerId};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::json;
use uuid::Uuid;

use crate::audit::write_audit;
use crate::entities::{cluster, outbox};
use crate::notifications::{WORKER_OFFLINE, WORKER_ONLINE, enqueue};
use crate::{Catalogue, now};

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
            WorkerEvent::Offline => WORKER_OFFLINE,
            WorkerEvent::Online => WORKER_ONLINE,
        }
    }
}

impl Catalogue {
    /// Records a worker event in the notification outbox and the audit log, in one
    /// transaction. `occurrence` tells repeated events apart (the session that ended, for
    /// instance); the same (cluster, worker, event, occurrence) is recorded once, so a new
    /// leader replaying what it saw does not notify twice.
    pub async fn record_worker_event(
        &self,
        tenant_id: TenantId,
        cluster_id: ClusterId,
        worker: &WorkerId,
        event: WorkerEvent,
        occurrence: &str,
    ) -> Result<bool> {
        self.in_transaction(async |txn| {
            let cluster_name = cluster::Entity::find_by_id(Uuid::from(cluster_id))
                .one(txn)
                .await?
                .map(|c| c.name)
                .unwrap_or_default();
            let payload = json!({
                "cluster": cluster_id,
                "clusterName": cluster_name,
                "worker": worker,
                "at": now(),
            });
            let dedup = format!("{}:{cluster_id}:{worker}:{occurrence}", event.as_str());
            let fresh = enqueue(txn, tenant_id, event.as_str(), &dedup, payload, &[], None).await?;
            if fresh {
                let operation = match event {
                    WorkerEvent::Offline => "workerOffline",
                    WorkerEvent::Online => "workerOnline",
                };
                let object = Some(format!("{cluster_id}/{worker}"));
                write_audit(txn, Some(tenant_id), None, operation, "worker", object).await?;
            }
            Ok(fresh)
        })
        .await
    }

    /// Whether the worker's latest membership event is an offline one.
    pub async fn worker_was_offline(
        &self,
        tenant_id: TenantId,
        cluster_id: ClusterId,
        worker: &WorkerId,
    ) -> Result<bool> {
        self.with_db(async |db| {
            let latest = |event: WorkerEvent| {
                outbox::Entity::find()
                    .filter(outbox::Column::TenantId.eq(Uuid::from(tenant_id)))
                    .filter(
                        outbox::Column::DedupKey
                            .starts_with(format!("{}:{cluster_id}:{worker}:", event.as_str())),
                    )
                    .order_by_desc(outbox::Column::Id)
                    .one(db)
            };
            let offline = latest(WorkerEvent::Offline).await?;
            let online = latest(WorkerEvent::Online).await?;
            Ok(match (offline, online) {
                (Some(off), Some(on)) => off.id > on.id,
                (Some(_), None) => true,
                _ => false,
            })
        })
        .await
    }
}
