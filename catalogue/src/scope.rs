//! The two scoped handles and their walls. A [`TenantHandle`] is what a verified user
//! may do inside one tenant; a [`ClusterHandle`] is what a verified worker credential may
//! do inside one cluster. Each reaches rows only through its finder (`find::<E>()`, the
//! scope condition `within::<E>()`), so the filter cannot be forgotten, and runs every
//! operation in one transaction under its wall: on Postgres the transaction takes a
//! runtime role that does not bypass row-level security, with the tenant's or cluster's
//! id as a transaction-local setting, so the database refuses what a missing filter
//! would let through. SQLite (standalone) has no such wall: the type-level scope only.

use std::sync::Arc;

use cloudtask_core::ids::{ClusterId, TenantId, UserId};
use cloudtask_core::roles::{Action, Role};
use cloudtask_core::{Error, Result};
use cloudtask_migrations::row_security::{
    CLUSTER_ROLE, CLUSTER_SETTING, TENANT_ROLE, TENANT_SETTING,
};
use sea_orm::sea_query::{Expr, ExprTrait, Query, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction,
    EntityTrait, QueryFilter, Select, Statement, TransactionTrait,
};
use uuid::Uuid;

use crate::Catalogue;
use crate::entities::{
    audit, cluster, membership, package, run, run_log_line, task, task_version, tenant,
};
use crate::error::{CatalogueError, DbResult};
use crate::live_events::Hub;

/// Who is acting, as the verified token says.
#[derive(Debug, Clone)]
pub struct Scope {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    /// Shown in the audit log.
    pub actor: String,
}

/// A member's capability inside one tenant: built from a verified identity whose
/// membership was read, it asks the role matrix before each operation.
#[derive(Debug, Clone)]
pub struct TenantHandle {
    pub(crate) db: DatabaseConnection,
    pub(crate) hub: Arc<Hub>,
    tenant_id: TenantId,
    user_id: UserId,
    actor: String,
    role: Role,
}

/// A worker credential's capability inside one cluster: claims, run starts, reports and
/// log lines, the packages its tasks use, fire cursors.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    pub(crate) db: DatabaseConnection,
    pub(crate) hub: Arc<Hub>,
    cluster_id: ClusterId,
}

impl Catalogue {
    /// The tenant handle for a verified identity. The membership is read now, so a role
    /// change or removal takes effect at once, whatever an older token says.
    pub async fn tenant(&self, scope: Scope) -> Result<TenantHandle> {
        let role = self
            .role_in(scope.user_id, scope.tenant_id)
            .await?
            .ok_or_else(|| Error::Forbidden("not a member of this tenant".into()))?;
        Ok(TenantHandle {
            db: self.db.clone(),
            hub: self.hub.clone(),
            tenant_id: scope.tenant_id,
            user_id: scope.user_id,
            actor: scope.actor,
            role,
        })
    }

    /// The cluster handle for a cluster id taken from a verified worker credential.
    pub fn cluster(&self, cluster_id: ClusterId) -> ClusterHandle {
        ClusterHandle {
            db: self.db.clone(),
            hub: self.hub.clone(),
            cluster_id,
        }
    }
}

impl TenantHandle {
    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub(crate) fn actor(&self) -> (UserId, &str) {
        (self.user_id, &self.actor)
    }

    pub(crate) fn require(&self, action: Action) -> Result<()> {
        if self.role.allows(action) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    /// The tenant's rows of `E`.
    pub(crate) fn find<E: OfTenant>(&self) -> Select<E> {
        E::find().filter(self.within::<E>())
    }

    /// The condition that keeps `E`'s rows to this tenant (for updates and deletes).
    pub(crate) fn within<E: OfTenant>(&self) -> SimpleExpr {
        E::of_tenant(self.tenant_id.into())
    }

    /// Runs `work` in one transaction behind the tenant's wall, and commits.
    pub(crate) async fn scoped<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        walled(&self.db, Wall::Tenant(self.tenant_id), Access::Write, work).await
    }

    /// Like [`TenantHandle::scoped`] for `work` that only reads.
    pub(crate) async fn reading<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        walled(&self.db, Wall::Tenant(self.tenant_id), Access::Read, work).await
    }

    /// Runs raw SQL behind the tenant's wall and returns each row's first column as
    /// text: for tests that check the wall holds without the handle's filters.
    #[doc(hidden)]
    pub async fn unfiltered_query(&self, sql: &str) -> Result<Vec<String>> {
        self.scoped(async |txn| first_column(txn, sql).await).await
    }
}

impl ClusterHandle {
    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    /// The cluster's rows of `E`.
    pub(crate) fn find<E: OfCluster>(&self) -> Select<E> {
        E::find().filter(self.within::<E>())
    }

    /// The condition that keeps `E`'s rows to this cluster (for updates and deletes).
    pub(crate) fn within<E: OfCluster>(&self) -> SimpleExpr {
        E::of_cluster(self.cluster_id.into())
    }

    /// Runs `work` in one transaction behind the cluster's wall, and commits.
    pub(crate) async fn scoped<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        walled(
            &self.db,
            Wall::Cluster(self.cluster_id),
            Access::Write,
            work,
        )
        .await
    }

    /// Like [`ClusterHandle::scoped`] for `work` that only reads.
    pub(crate) async fn reading<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        walled(&self.db, Wall::Cluster(self.cluster_id), Access::Read, work).await
    }

    /// Runs raw SQL behind the cluster's wall and returns each row's first column as
    /// text: for tests that check the wall holds without the handle's filters.
    #[doc(hidden)]
    pub async fn unfiltered_query(&self, sql: &str) -> Result<Vec<String>> {
        self.scoped(async |txn| first_column(txn, sql).await).await
    }
}

/// Whose rows a walled transaction may reach.
#[derive(Debug, Clone, Copy)]
enum Wall {
    Tenant(TenantId),
    Cluster(ClusterId),
}

/// Whether a walled transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Begins a transaction, puts it behind `wall` (Postgres), runs `work`, and commits a
/// write. A read is made read-only by the database and ends without a COMMIT round
/// trip: dropping it rolls it back, flushed when its connection goes back to the pool.
async fn walled<T>(
    db: &DatabaseConnection,
    wall: Wall,
    access: Access,
    work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
) -> Result<T> {
    let txn = db.begin().await.map_err(CatalogueError::from)?;
    if db.get_database_backend() == DatabaseBackend::Postgres {
        let (role, setting, id) = match wall {
            Wall::Tenant(id) => (TENANT_ROLE, TENANT_SETTING, Uuid::from(id)),
            Wall::Cluster(id) => (CLUSTER_ROLE, CLUSTER_SETTING, Uuid::from(id)),
        };
        // One round trip: `set_config('role', …, true)` is SET LOCAL ROLE.
        let sql = match access {
            Access::Write => "SELECT set_config('role', $1, true), set_config($2, $3, true)",
            Access::Read => {
                "SELECT set_config('role', $1, true), set_config($2, $3, true), \
                 set_config('transaction_read_only', 'on', true)"
            }
        };
        txn.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            sql,
            [role.into(), setting.into(), id.to_string().into()],
        ))
        .await
        .map_err(CatalogueError::from)?;
    }
    let value = work(&txn).await?;
    if access == Access::Write {
        txn.commit().await.map_err(CatalogueError::from)?;
    }
    Ok(value)
}

async fn first_column(conn: &impl ConnectionTrait, sql: &str) -> DbResult<Vec<String>> {
    let rows = conn
        .query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.try_get_by_index::<String>(0).ok())
        .collect())
}

/// An entity whose rows belong to one tenant.
pub(crate) trait OfTenant: EntityTrait {
    fn of_tenant(tenant: Uuid) -> SimpleExpr;
}

/// An entity whose rows a cluster's workers may reach.
pub(crate) trait OfCluster: EntityTrait {
    fn of_cluster(cluster: Uuid) -> SimpleExpr;
}

macro_rules! tenant_column {
    ($($entity:ident),*) => {$(
        impl OfTenant for $entity::Entity {
            fn of_tenant(tenant: Uuid) -> SimpleExpr {
                $entity::Column::TenantId.eq(tenant)
            }
        }
    )*};
}

tenant_column!(cluster, task, package, run, membership, audit);

impl OfTenant for tenant::Entity {
    fn of_tenant(tenant: Uuid) -> SimpleExpr {
        tenant::Column::Id.eq(tenant)
    }
}

impl OfTenant for task_version::Entity {
    fn of_tenant(tenant: Uuid) -> SimpleExpr {
        task_version::Column::TaskId.in_subquery(
            Query::select()
                .column(task::Column::Id)
                .from(task::Entity)
                .and_where(task::Column::TenantId.eq(tenant))
                .to_owned(),
        )
    }
}

impl OfTenant for run_log_line::Entity {
    fn of_tenant(tenant: Uuid) -> SimpleExpr {
        run_log_line::Column::RunId.in_subquery(
            Query::select()
                .column(run::Column::Id)
                .from(run::Entity)
                .and_where(run::Column::TenantId.eq(tenant))
                .to_owned(),
        )
    }
}

impl OfCluster for task::Entity {
    fn of_cluster(cluster: Uuid) -> SimpleExpr {
        task::Column::ClusterId.eq(cluster)
    }
}

impl OfCluster for run::Entity {
    fn of_cluster(cluster: Uuid) -> SimpleExpr {
        run::Column::ClusterId.eq(cluster)
    }
}

/// The packages a task of the cluster uses.
impl OfCluster for package::Entity {
    fn of_cluster(cluster: Uuid) -> SimpleExpr {
        Expr::tuple([
            Expr::col(package::Column::TenantId),
            Expr::col(package::Column::Sha256),
        ])
        .in_subquery(
            Query::select()
                .columns([task::Column::TenantId, task::Column::PackageSha256])
                .from(task::Entity)
                .and_where(task::Column::ClusterId.eq(cluster))
                .to_owned(),
        )
    }
}
