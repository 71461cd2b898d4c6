//! Clusters: a tenant's groups of workers, each with a join token (stored hashed) that
//! its workers exchange for a credential. Every change notifies the scheduler's mirror.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, TaskId, TenantId};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::protocol::TaskEnv;
use cloudtask_core::roles::Action;
use cloudtask_core::task::validate_name;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder,
};
use uuid::Uuid;

use crate::entities::{cluster, task};
use crate::error::{DbResult, conflict_as};
use crate::mirror_changes::notify;
use crate::{Catalogue, ClusterHandle, TenantHandle, now};

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub id: ClusterId,
    pub tenant_id: TenantId,
    pub name: String,
    pub token_rotated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// What its tasks' runs get for the limits they leave unset.
    pub default_limits: RunLimits,
}

impl From<cluster::Model> for Cluster {
    fn from(m: cluster::Model) -> Self {
        // Written by this crate only; anything unreadable reads as no defaults.
        let default_limits = m
            .default_limits
            .and_then(|json| serde_json::from_value(json).ok())
            .unwrap_or_default();
        Cluster {
            default_limits,
            id: m.id.into(),
            tenant_id: m.tenant_id.into(),
            name: m.name,
            token_rotated_at: m.token_rotated_at,
            created_at: m.created_at,
        }
    }
}

impl Catalogue {
    /// A worker presents its cluster's join token (hashed by the caller).
    pub async fn cluster_by_join_token(&self, token_hash: &str) -> Result<Option<Cluster>> {
        self.with_db(async |db| {
            let found = cluster::Entity::find()
                .filter(cluster::Column::JoinTokenHash.eq(token_hash))
                .one(db)
                .await?;
            Ok(found.map(Into::into))
        })
        .await
    }

    /// Every cluster of every tenant (the scheduler).
    pub async fn all_clusters(&self) -> Result<Vec<Cluster>> {
        self.with_db(async |db| {
            let rows = cluster::Entity::find()
                .order_by_asc(cluster::Column::Id)
                .all(db)
                .await?;
            Ok(rows.into_iter().map(Into::into).collect())
        })
        .await
    }

    /// Any tenant's cluster (the scheduler).
    pub async fn cluster_by_id(&self, id: ClusterId) -> Result<Option<Cluster>> {
        self.with_db(async |db| {
            let found = cluster::Entity::find_by_id(Uuid::from(id)).one(db).await?;
            Ok(found.map(Into::into))
        })
        .await
    }
}

impl TenantHandle {
    pub async fn clusters(&self) -> Result<Vec<Cluster>> {
        self.reading(Action::Read, async |txn| {
            let rows = self
                .find::<cluster::Entity>()
                .order_by_asc(cluster::Column::Id)
                .all(txn)
                .await?;
            Ok(rows.into_iter().map(Into::into).collect())
        })
        .await
    }

    pub(crate) async fn cluster_model(
        &self,
        conn: &impl ConnectionTrait,
        id: ClusterId,
    ) -> DbResult<cluster::Model> {
        Ok(self
            .find::<cluster::Entity>()
            .filter(cluster::Column::Id.eq(Uuid::from(id)))
            .one(conn)
            .await?
            .ok_or(Error::NotFound("cluster"))?)
    }

    pub async fn cluster(&self, id: ClusterId) -> Result<Cluster> {
        self.reading(Action::Read, async |txn| {
            Ok(self.cluster_model(txn, id).await?.into())
        })
        .await
    }

    /// `join_token_hash`: the caller generates the token, shows it once, stores the hash.
    pub async fn create_cluster(&self, name: &str, join_token_hash: String) -> Result<Cluster> {
        self.require(Action::ManageClusters).await?;
        validate_name("name", name)?;
        self.scoped(Action::ManageClusters, async |txn| {
            let now = now();
            let model = cluster::Entity::insert(cluster::ActiveModel {
                id: Set(ClusterId::new().into()),
                tenant_id: Set(self.tenant_id().into()),
                name: Set(name.trim().to_owned()),
                join_token_hash: Set(join_token_hash),
                token_rotated_at: Set(now),
                created_at: Set(now),
                default_limits: Set(None),
            })
            .exec_with_returning(txn)
            .await
            .map_err(conflict_as("a cluster with this name"))?;
            let cluster = Cluster::from(model);
            self.audit(txn, "createCluster", "cluster", cluster.id)
                .await?;
            notify(txn, cluster.id).await?;
            Ok(cluster)
        })
        .await
    }

    pub async fn rotate_cluster_token(
        &self,
        id: ClusterId,
        join_token_hash: String,
    ) -> Result<Cluster> {
        self.scoped(Action::ManageClusters, async |txn| {
            let mut model = self.cluster_model(txn, id).await?;
            model.join_token_hash = join_token_hash;
            model.token_rotated_at = now();
            cluster::Entity::update_many()
                .col_expr(
                    cluster::Column::JoinTokenHash,
                    Expr::value(model.join_token_hash.clone()),
                )
                .col_expr(
                    cluster::Column::TokenRotatedAt,
                    Expr::value(model.token_rotated_at),
                )
                .filter(self.within::<cluster::Entity>())
                .filter(cluster::Column::Id.eq(Uuid::from(id)))
                .exec(txn)
                .await?;
            self.audit(txn, "rotateClusterToken", "cluster", id).await?;
            // The cluster's workers' ZooKeeper identity derives from the rotation time:
            // the mirror re-sets the cluster's ACLs, cutting off the old token's workers.
            notify(txn, id).await?;
            Ok(model.into())
        })
        .await
    }

    /// Sets the default limits of the cluster's tasks' runs (replacing the previous
    /// ones); the scheduler mirrors them into every task of it that leaves one unset.
    pub async fn set_cluster_default_limits(
        &self,
        id: ClusterId,
        limits: RunLimits,
    ) -> Result<Cluster> {
        self.require(Action::ManageClusters).await?;
        limits.validate()?;
        self.scoped(Action::ManageClusters, async |txn| {
            let mut model = self.cluster_model(txn, id).await?;
            let json = (!limits.is_empty())
                .then(|| serde_json::to_value(limits).expect("limits always serialise"));
            model.default_limits = json.clone();
            cluster::Entity::update_many()
                .col_expr(cluster::Column::DefaultLimits, Expr::value(json))
                .filter(self.within::<cluster::Entity>())
                .filter(cluster::Column::Id.eq(Uuid::from(id)))
                .exec(txn)
                .await?;
            self.audit(txn, "setClusterLimits", "cluster", id).await?;
            notify(txn, id).await?;
            Ok(model.into())
        })
        .await
    }

    /// Refused while the cluster still holds tasks: deleting them silently would surprise.
    pub async fn delete_cluster(&self, id: ClusterId) -> Result<()> {
        self.scoped(Action::ManageClusters, async |txn| {
            self.cluster_model(txn, id).await?;
            let tasks = self
                .find::<task::Entity>()
                .filter(task::Column::ClusterId.eq(Uuid::from(id)))
                .count(txn)
                .await?;
            if tasks > 0 {
                Err(Error::Conflict(format!(
                    "the cluster still has {tasks} task(s); delete or move them first"
                )))?;
            }
            cluster::Entity::delete_many()
                .filter(self.within::<cluster::Entity>())
                .filter(cluster::Column::Id.eq(Uuid::from(id)))
                .exec(txn)
                .await?;
            self.audit(txn, "deleteCluster", "cluster", id).await?;
            notify(txn, id).await
        })
        .await
    }
}

impl ClusterHandle {
    /// The environment and version of each of `tasks` that is this cluster's: what a
    /// worker gets with a claim or a start, since env values never go to ZooKeeper.
    pub async fn task_envs(&self, tasks: &[TaskId]) -> Result<HashMap<TaskId, (u32, TaskEnv)>> {
        if tasks.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Uuid> = tasks.iter().map(|&t| Uuid::from(t)).collect();
        self.reading(async |txn| {
            let rows = self
                .find::<task::Entity>()
                .filter(task::Column::Id.is_in(ids))
                .all(txn)
                .await?;
            let mut envs = HashMap::new();
            for row in rows {
                let task = crate::Task::try_from(row)?;
                envs.insert(task.id, (task.version, task.spec.env));
            }
            Ok(envs)
        })
        .await
    }
}
