//! The catalogue: the only code that touches SQL. Platform-level operations (accounts,
//! tenants, worker join) hang off [`Catalogue`]; everything inside a tenant goes through
//! a [`TenantHandle`], which is built from a verified identity and checks the role
//! matrix before each operation. There is no other way to reach tenant data.

mod accounts;
pub mod changes;
mod entities;
pub mod events;
pub mod notifications;
pub mod records;
mod runs;
mod system;
mod tenant;

use chrono::{DateTime, Utc};
use cloudtask_core::task::TaskSpec;
use cloudtask_core::{Error, Result};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, SqlErr};
use uuid::Uuid;

pub use accounts::{NewUser, RefreshOutcome};
pub use runs::{MAX_LOG_BATCH, RunFilter, RunLog};
pub use system::WorkerEvent;
pub use tenant::{NewPackage, NewTask, Scope, TaskEdit, TaskFilter, TenantHandle};

/// A handle on the catalogue database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Catalogue {
    db: DatabaseConnection,
    hub: std::sync::Arc<events::Hub>,
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
            use sea_orm::ConnectionTrait;
            db.execute_unprepared("PRAGMA journal_mode=WAL")
                .await
                .map_err(db_err)?;
        }
        Ok(Catalogue {
            db,
            hub: events::Hub::new(),
        })
    }

    /// Applies pending migrations; with none pending it changes nothing.
    pub async fn migrate(&self) -> Result<()> {
        use cloudtask_migrations::{Migrator, MigratorTrait};
        Migrator::up(&self.db, None).await.map_err(db_err)
    }

    /// Readiness: one round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await.map_err(db_err)
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// An audit row for a platform-level event (logins, logouts).
    pub async fn record_audit(
        &self,
        tenant_id: Option<cloudtask_core::ids::TenantId>,
        actor: cloudtask_core::ids::UserId,
        operation: &str,
    ) -> Result<()> {
        let actor_text = actor.to_string();
        accounts::audit(
            &self.db,
            tenant_id,
            Some((actor, &actor_text)),
            operation,
            "user",
            Some(actor_text.clone()),
        )
        .await
    }

    pub fn backend(&self) -> sea_orm::DatabaseBackend {
        self.db.get_database_backend()
    }
}

/// Maps a database error into the domain: a unique violation is a conflict; the rest is
/// internal, logged with detail and returned without it.
pub(crate) fn db_err(e: DbErr) -> Error {
    if let Some(SqlErr::UniqueConstraintViolation(_)) = e.sql_err() {
        return Error::Conflict("already exists".into());
    }
    tracing::error!(error = %e, "catalogue query failed");
    Error::internal(e)
}

pub(crate) fn conflict_or(e: DbErr, what: &str) -> Error {
    match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => {
            Error::Conflict(format!("{what} already exists"))
        }
        _ => db_err(e),
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
