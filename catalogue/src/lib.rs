//! The catalogue: the only code that touches SQL. One module per resource it owns.
//! Platform-level and cross-tenant operations (accounts, tenants, worker join, the
//! scheduler's reads and writes) hang off [`Catalogue`], under the owner role; everything
//! inside a tenant goes through a [`TenantHandle`], and what a worker may do through a
//! [`ClusterHandle`] (see `scope`). There is no other way to reach tenant data.

mod accounts;
mod audit;
mod clusters;
mod entities;
mod error;
pub mod live_events;
mod logs;
pub mod mirror_changes;
pub mod notifications;
mod packages;
mod retention;
mod runs;
mod scope;
mod tasks;
mod tenants;
mod workers;

use chrono::{DateTime, Utc};
use cloudtask_core::task::TaskSpec;
use cloudtask_core::{Error, Result};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    TransactionTrait,
};
use uuid::Uuid;

pub use accounts::{NewUser, RefreshOutcome, User, UserCredentials};
pub use audit::AuditEntry;
pub use clusters::Cluster;
pub use logs::{MAX_LOG_BATCH, RunLog};
pub use packages::{NewPackage, PackageInfo};
pub use retention::RetentionSettings;
pub use runs::{PendingCommands, Run, RunFilter, machine};
pub use scope::{ClusterHandle, Scope, TenantHandle};
pub use tasks::{NewTask, Task, TaskEdit, TaskFilter, TaskVersion};
pub use tenants::{Member, Membership, Tenant};
pub use workers::WorkerEvent;

use error::{CatalogueError, DbResult};

/// A handle on the catalogue database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Catalogue {
    db: DatabaseConnection,
    hub: std::sync::Arc<live_events::Hub>,
    /// How long a queued run may wait for a worker (`queue_expiry_secs`).
    queue_expiry: std::time::Duration,
}

/// A page of rows ordered by id (UUID v7, so by creation), with the keyset cursor.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_next: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub first: u64,
    pub after: Option<Uuid>,
}

pub const MAX_PAGE: u64 = 200;

/// `queue_expiry_secs` by default.
pub const DEFAULT_QUEUE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(300);

impl PageRequest {
    /// Rows to read: one more than the page, to know whether another follows.
    pub(crate) fn limit(self) -> u64 {
        self.first.min(MAX_PAGE) + 1
    }

    /// The page out of rows read with [`PageRequest::limit`].
    pub(crate) fn page<T>(self, mut rows: Vec<T>) -> Page<T> {
        let first = self.first.min(MAX_PAGE) as usize;
        let has_next = rows.len() > first;
        rows.truncate(first);
        Page {
            items: rows,
            has_next,
        }
    }
}

impl Catalogue {
    /// Connects to Postgres (`postgres://…`) or SQLite (`sqlite:…?mode=rwc`).
    pub async fn connect(url: &str) -> Result<Self> {
        let mut options = ConnectOptions::new(url.to_owned());
        options.max_connections(20).sqlx_logging(false);
        let db = Database::connect(options).await.map_err(|e| {
            tracing::error!(error = %e, "cannot connect to the catalogue database");
            Error::internal(format!("database connection failed: {e}"))
        })?;
        if db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite
            && !url.contains(":memory:")
        {
            // Readers never wait for the writer (the API reads while a worker's reports
            // are written); the setting stays with the database file.
            db.execute_unprepared("PRAGMA journal_mode=WAL")
                .await
                .map_err(CatalogueError::from)?;
        }
        Ok(Catalogue {
            db,
            hub: live_events::Hub::new(),
            queue_expiry: DEFAULT_QUEUE_EXPIRY,
        })
    }

    /// The catalogue with queued runs expiring after `expiry` (`queue_expiry_secs`; the
    /// scheduler leader ends them, see [`Catalogue::expire_queued_runs`]).
    pub fn with_queue_expiry(mut self, expiry: std::time::Duration) -> Self {
        self.queue_expiry = expiry;
        self
    }

    pub fn queue_expiry(&self) -> std::time::Duration {
        self.queue_expiry
    }

    /// Applies pending migrations; with none pending it changes nothing.
    pub async fn migrate(&self) -> Result<()> {
        use cloudtask_migrations::{Migrator, MigratorTrait};
        self.with_db(async |db| Ok(Migrator::up(db, None).await?))
            .await
    }

    /// Readiness: one round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        self.with_db(async |db| Ok(db.ping().await?)).await
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn backend(&self) -> sea_orm::DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Runs `work` on the owner's connection (cross-tenant, no wall).
    pub(crate) async fn with_db<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseConnection) -> DbResult<T>,
    ) -> Result<T> {
        Ok(work(&self.db).await?)
    }

    /// Runs `work` in one transaction on the owner's connection (cross-tenant, no wall).
    pub(crate) async fn in_transaction<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> DbResult<T>,
    ) -> Result<T> {
        let txn = self.db.begin().await.map_err(CatalogueError::from)?;
        let value = work(&txn).await?;
        txn.commit().await.map_err(CatalogueError::from)?;
        Ok(value)
    }
}

pub(crate) fn decode_spec(value: serde_json::Value) -> Result<TaskSpec> {
    serde_json::from_value(value).map_err(|e| Error::internal(format!("stored task spec: {e}")))
}

pub(crate) fn encode_spec(spec: &TaskSpec) -> serde_json::Value {
    serde_json::to_value(spec).expect("a TaskSpec always serialises")
}

pub(crate) fn now() -> DateTime<Utc> {
    // Microsecond precision: what Postgres stores, so a value read back compares equal.
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
