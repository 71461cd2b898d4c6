//! Catalogue change notifications for the scheduler's mirror: the one seam for a
//! Postgres-only feature.
//!
//! Every write that changes what the scheduler mirrors (a cluster or a task) notifies the
//! cluster's id on the `cloudtask_changes` channel inside its transaction, so the
//! notification is delivered exactly when the change commits. The scheduler leader
//! listens and reconciles that cluster within moments; its slow sweep covers anything a
//! lost connection made it miss (it is told to resync). Payloads are ids only, far below
//! Postgres's 8,000-byte limit. On SQLite (standalone) notifications are not sent; the
//! in-process scheduler relies on its sweep there.

use cloudtask_core::ids::ClusterId;
use cloudtask_core::{Error, Result};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

use crate::Catalogue;
use crate::error::DbResult;

pub const CHANNEL: &str = "cloudtask_changes";

pub(crate) async fn notify(conn: &impl ConnectionTrait, cluster: ClusterId) -> DbResult<()> {
    if conn.get_database_backend() == DatabaseBackend::Postgres {
        conn.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), cluster.to_string().into()],
        ))
        .await?;
    }
    Ok(())
}

/// What the listener heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Something in this cluster (or the cluster itself) changed.
    Cluster(ClusterId),
    /// The connection was lost and re-established: notifications may have been missed.
    Resync,
}

/// Changes as they are heard, queued by a task that owns the LISTEN connection, so a
/// consumer can take everything pending at once and act on each cluster once.
pub struct Changes {
    rx: tokio::sync::mpsc::UnboundedReceiver<Change>,
    _listener: tokio::task::JoinHandle<()>,
}

impl Catalogue {
    /// Subscribes to change notifications (Postgres only).
    pub async fn listen_changes(&self) -> Result<Changes> {
        if self.backend() != DatabaseBackend::Postgres {
            return Err(Error::internal("change notifications need Postgres"));
        }
        let mut listener = listen(self.db.get_postgres_connection_pool(), CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = tokio::spawn(async move {
            loop {
                let change = next_change(&mut listener).await;
                if tx.send(change).is_err() {
                    return;
                }
            }
        });
        Ok(Changes {
            rx,
            _listener: forward,
        })
    }
}

/// A LISTEN connection of its own on `channel`.
pub(crate) async fn listen(pool: &sea_orm::sqlx::PgPool, channel: &str) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool)
        .await
        .map_err(|e| Error::internal(format!("LISTEN connection: {e}")))?;
    listener
        .listen(channel)
        .await
        .map_err(|e| Error::internal(format!("LISTEN {channel}: {e}")))?;
    Ok(listener)
}

/// The next change (a bad payload is logged and passed over).
async fn next_change(listener: &mut PgListener) -> Change {
    loop {
        let Some(payload) = heard(listener, "change").await else {
            return Change::Resync;
        };
        match payload.parse() {
            Ok(cluster) => return Change::Cluster(cluster),
            Err(_) => tracing::warn!(%payload, "ignoring a bad notification"),
        }
    }
}

/// The payload of the next notification `listener` hears, or `None` when its connection
/// was lost and is back (notifications may have been missed). While the database is
/// unreachable this keeps retrying (sqlx reconnects), once a second. `what` names the
/// listener in the log.
pub(crate) async fn heard(listener: &mut PgListener, what: &str) -> Option<String> {
    // sqlx says `None` only when it reconnects at once (its pool hands it a connection);
    // after an error (the database down longer than the pool's acquire timeout) a later
    // call reconnects without a word, so the loss is remembered here.
    let mut lost = false;
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) if lost => return None, // what came before it may be missed
            Ok(Some(notification)) => return Some(notification.payload().to_owned()),
            Ok(None) => return None,
            Err(e) => {
                lost = true;
                tracing::warn!(error = %e, "{what} listener lost the database; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self._listener.abort();
    }
}

impl Changes {
    /// Waits for the next change, then takes every other change already heard: the
    /// distinct clusters, or `None` when a resync is due. A burst of writes (a thousand
    /// tasks created) costs one reconcile per cluster, not one per write.
    pub async fn next_batch(&mut self) -> Option<Vec<ClusterId>> {
        let first = self.rx.recv().await?;
        let mut clusters = Vec::new();
        let mut resync = false;
        let mut take = |change: Change| match change {
            Change::Cluster(cluster) => {
                if !clusters.contains(&cluster) {
                    clusters.push(cluster);
                }
            }
            Change::Resync => resync = true,
        };
        take(first);
        while let Ok(change) = self.rx.try_recv() {
            take(change);
        }
        Some(if resync { Vec::new() } else { clusters })
    }
}
