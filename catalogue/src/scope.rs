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
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
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

/// A member's capability inside one tenant: built from a verified identity, it asks the
/// role matrix before each operation, with the role held now. The role is read once per
/// handle (a handle lives for one request, or one operation on a socket), by its first
/// operation, in the statement that raises the operation's wall: no round trip of its
/// own. Walled operations read the role again with their wall and check it, so what they
/// do is checked against the role of their own transaction.
#[derive(Debug, Clone)]
pub struct TenantHandle {
    pub(crate) db: DatabaseConnection,
    pub(crate) hub: Arc<Hub>,
    tenant_id: TenantId,
    user_id: UserId,
    actor: String,
    role: Arc<OnceCell<Role>>,
    /// Connections the handle may hold at once ([`TenantHandle::with_lanes`]).
    lanes: Option<Arc<Semaphore>>,
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
    /// The tenant handle for a verified identity. The membership is read by its first
    /// operation (or [`TenantHandle::role`]), so a role change or removal takes effect at
    /// once, whatever an older token says: a non-member's first operation is FORBIDDEN.
    pub async fn tenant(&self, scope: Scope) -> Result<TenantHandle> {
        Ok(TenantHandle {
            db: self.db.clone(),
            hub: self.hub.clone(),
            tenant_id: scope.tenant_id,
            user_id: scope.user_id,
            actor: scope.actor,
            role: Arc::default(),
            lanes: None,
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
    /// The handle's operations hold at most one of `lanes`' permits each while they use a
    /// connection: an API gives every handle of one user the same lanes, so one caller's
    /// fan-out (aliases, nested lists, many subscriptions) waits for its own lanes instead
    /// of taking the pool from everyone else.
    pub fn with_lanes(mut self, lanes: Arc<Semaphore>) -> Self {
        self.lanes = Some(lanes);
        self
    }

    /// One of the handle's lanes, held for one operation.
    async fn lane(&self) -> Option<OwnedSemaphorePermit> {
        match &self.lanes {
            Some(lanes) => lanes.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    /// The caller's role in the tenant (read once per handle); FORBIDDEN when they are
    /// not a member.
    pub async fn role(&self) -> Result<Role> {
        let role = self
            .role
            .get_or_try_init(|| async {
                let _lane = self.lane().await;
                let found = membership::Entity::find_by_id((
                    Uuid::from(self.tenant_id),
                    Uuid::from(self.user_id),
                ))
                .one(&self.db)
                .await
                .map_err(CatalogueError::from)?;
                found
                    .and_then(|m| Role::parse(&m.role))
                    .ok_or_else(not_a_member)
            })
            .await?;
        Ok(*role)
    }

    pub(crate) fn actor(&self) -> (UserId, &str) {
        (self.user_id, &self.actor)
    }

    pub(crate) async fn require(&self, action: Action) -> Result<()> {
        allowed(self.role().await?, action)
    }

    /// The tenant's rows of `E`.
    pub(crate) fn find<E: OfTenant>(&self) -> Select<E> {
        E::find().filter(self.within::<E>())
    }

    /// The condition that keeps `E`'s rows to this tenant (for updates and deletes).
    pub(crate) fn within<E: OfTenant>(&self) -> SimpleExpr {
        E::of_tenant(self.tenant_id.into())
    }

    /// Runs `work` in one transaction behind the tenant's wall, once the role held now
    /// allows `action`, and commits.
    pub(crate) async fn scoped<T>(
        &self,
        action: Action,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        let _lane = self.lane().await;
        let member = self.acting(action);
        walled(
            &self.db,
            Wall::Tenant(self.tenant_id, member),
            Access::Write,
            work,
        )
        .await
    }

    /// Like [`TenantHandle::scoped`] for `work` that only reads.
    pub(crate) async fn reading<T>(
        &self,
        action: Action,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        let _lane = self.lane().await;
        let member = self.acting(action);
        walled(
            &self.db,
            Wall::Tenant(self.tenant_id, member),
            Access::Read,
            work,
        )
        .await
    }

    fn acting(&self, action: Action) -> Member<'_> {
        Member {
            user: self.user_id,
            action,
            role: &self.role,
        }
    }

    /// Runs raw SQL behind the tenant's wall and returns each row's first column as
    /// text: for tests that check the wall holds without the handle's filters.
    #[doc(hidden)]
    pub async fn unfiltered_query(&self, sql: &str) -> Result<Vec<String>> {
        self.scoped(Action::Read, async |txn| first_column(txn, sql).await)
            .await
    }
}

fn not_a_member() -> Error {
    Error::Forbidden("not a member of this tenant".into())
}

fn allowed(role: Role, action: Action) -> Result<()> {
    if role.allows(action) {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "the {} role may not do this",
            role.as_str()
        )))
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

/// Whose rows a walled transaction may reach: a member's (checked in the same round
/// trip), or a cluster's.
#[derive(Debug, Clone, Copy)]
enum Wall<'a> {
    Tenant(TenantId, Member<'a>),
    Cluster(ClusterId),
}

/// The member acting behind a tenant's wall, what they do, and where their role is kept.
#[derive(Debug, Clone, Copy)]
struct Member<'a> {
    user: UserId,
    action: Action,
    role: &'a OnceCell<Role>,
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
///
/// Behind a tenant's wall the member's role is read in the same statement that raises the
/// wall (as the catalogue's owner, before the wall applies: the membership is looked up
/// by its key), and the action is checked against it before `work` runs.
async fn walled<T>(
    db: &DatabaseConnection,
    wall: Wall<'_>,
    access: Access,
    work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
) -> Result<T> {
    let txn = db.begin().await.map_err(CatalogueError::from)?;
    let role = if db.get_database_backend() == DatabaseBackend::Postgres {
        raise_wall(&txn, wall, access).await?
    } else if let Wall::Tenant(tenant, member) = wall {
        membership::Entity::find_by_id((Uuid::from(tenant), Uuid::from(member.user)))
            .one(&txn)
            .await
            .map_err(CatalogueError::from)?
            .map(|m| m.role)
    } else {
        None
    };
    if let Wall::Tenant(_, member) = wall {
        let role = role
            .as_deref()
            .and_then(Role::parse)
            .ok_or_else(not_a_member)?;
        let _ = member.role.set(role);
        allowed(role, member.action)?;
    }
    let value = work(&txn).await?;
    if access == Access::Write {
        txn.commit().await.map_err(CatalogueError::from)?;
    }
    Ok(value)
}

/// Postgres: one round trip that takes the runtime role, sets the wall's id (and makes a
/// read read-only), and for a tenant's wall reads the member's role.
async fn raise_wall(
    txn: &DatabaseTransaction,
    wall: Wall<'_>,
    access: Access,
) -> Result<Option<String>> {
    // `set_config('role', …, true)` is SET LOCAL ROLE.
    let read_only = match access {
        Access::Write => "",
        Access::Read => ", set_config('transaction_read_only', 'on', true)",
    };
    let (sql, values): (String, Vec<sea_orm::Value>) = match wall {
        Wall::Tenant(tenant, member) => (
            format!(
                "SELECT set_config('role', $1, true), set_config($2, $3, true){read_only}, \
                 (SELECT role FROM memberships WHERE tenant_id = $4 AND user_id = $5) \
                 AS member_role"
            ),
            vec![
                TENANT_ROLE.into(),
                TENANT_SETTING.into(),
                Uuid::from(tenant).to_string().into(),
                Uuid::from(tenant).into(),
                Uuid::from(member.user).into(),
            ],
        ),
        Wall::Cluster(cluster) => (
            format!("SELECT set_config('role', $1, true), set_config($2, $3, true){read_only}"),
            vec![
                CLUSTER_ROLE.into(),
                CLUSTER_SETTING.into(),
                Uuid::from(cluster).to_string().into(),
            ],
        ),
    };
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            sql,
            values,
        ))
        .await
        .map_err(CatalogueError::from)?;
    Ok(match (wall, row) {
        (Wall::Tenant(..), Some(row)) => row
            .try_get::<Option<String>>("", "member_role")
            .map_err(CatalogueError::from)?,
        _ => None,
    })
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
