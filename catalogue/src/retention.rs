//! Retention: a tenant's history pruned to its horizons (see
//! [`cloudtask_core::retention`]). One pass walks every tenant, task by task, and deletes
//! in batches of at most `batch` rows, each batch its own short transaction: runs beyond
//! a horizon with their lines, then the lines of runs past the log horizon (the runs
//! stay), audit entries, packages no task or task version refers to. A run that has not
//! ended, and the newest ended run of each task (its `lastRun`), are never pruned.
//!
//! Ages are read from ids (UUID v7 carries its creation time), so every statement walks
//! an index from its oldest entry and stops at the first it must keep.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::TenantId;
use cloudtask_core::retention::{Pruned, Retention};
use cloudtask_core::roles::Action;
use cloudtask_core::run::RunStatus;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde_json::json;
use uuid::Uuid;

use crate::entities::{audit, package, run, run_log_line, task, task_version, tenant};
use crate::error::DbResult;
use crate::{Catalogue, TenantHandle};

/// A package no task refers to is kept this long after its upload: it may be about to be
/// used by the task being created.
const PACKAGE_GRACE: chrono::Duration = chrono::Duration::days(1);

/// A tenant's retention as it reads it: its own horizons, what holds (within the
/// platform's), and what the last pass that deleted anything deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSettings {
    pub own: Retention,
    pub held: Retention,
    pub platform: Retention,
    pub last_prune: Option<Pruned>,
}

impl TenantHandle {
    /// The tenant's retention (any member).
    pub async fn retention(&self, platform: &Retention) -> Result<RetentionSettings> {
        let row = self
            .reading(Action::Read, async |txn| {
                Ok(self
                    .find::<tenant::Entity>()
                    .one(txn)
                    .await?
                    .ok_or(Error::NotFound("tenant"))?)
            })
            .await?;
        let own = own_retention(row.retention);
        Ok(RetentionSettings {
            own,
            held: platform.within(&own),
            platform: *platform,
            last_prune: row.last_prune.and_then(|v| serde_json::from_value(v).ok()),
        })
    }

    /// Sets the tenant's own horizons (ADMIN and above): each at most the platform's;
    /// unset, the platform's holds.
    pub async fn set_retention(&self, own: Retention, platform: &Retention) -> Result<()> {
        self.require(Action::ManageRetention).await?;
        platform.check_own(&own)?;
        self.scoped(Action::ManageRetention, async |txn| {
            tenant::Entity::update_many()
                .col_expr(tenant::Column::Retention, Expr::value(json!(own)))
                .filter(self.within::<tenant::Entity>())
                .exec(txn)
                .await?;
            self.audit(txn, "setRetention", "tenant", self.tenant_id())
                .await
        })
        .await
    }
}

/// A tenant's stored horizons (none set: all the platform's).
fn own_retention(stored: Option<serde_json::Value>) -> Retention {
    stored
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// The smallest UUID v7 of `at`: every id made before `at` is below it.
fn id_at(at: DateTime<Utc>) -> Uuid {
    let millis = at.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70; // version 7
    bytes[8] = 0x80; // RFC 4122 variant
    Uuid::from_bytes(bytes)
}

fn days_before(now: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    now - chrono::Duration::days(i64::from(days))
}

fn ended() -> Vec<&'static str> {
    RunStatus::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect()
}

impl Catalogue {
    /// One pruning pass over every tenant, with the platform's horizons `platform` and
    /// each tenant's own within them, as of `now`. What it deleted of each tenant is
    /// returned, and recorded as the tenant's `lastPrune` when it deleted anything.
    pub async fn prune(
        &self,
        platform: &Retention,
        batch: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<(TenantId, Pruned)>> {
        Ok(self.prune_all(platform, batch, now).await?)
    }

    async fn prune_all(
        &self,
        platform: &Retention,
        batch: u32,
        now: DateTime<Utc>,
    ) -> DbResult<Vec<(TenantId, Pruned)>> {
        let batch = u64::from(batch.max(1));
        let tenants: Vec<(Uuid, Option<serde_json::Value>)> = tenant::Entity::find()
            .select_only()
            .column(tenant::Column::Id)
            .column(tenant::Column::Retention)
            .order_by_asc(tenant::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut done = Vec::with_capacity(tenants.len());
        for (tenant_id, own) in tenants {
            let held = platform.within(&own_retention(own));
            let pruned = self.prune_tenant(tenant_id, &held, batch, now).await?;
            if !pruned.is_empty() {
                tenant::Entity::update_many()
                    .col_expr(tenant::Column::LastPrune, Expr::value(json!(pruned)))
                    .filter(tenant::Column::Id.eq(tenant_id))
                    .exec(&self.db)
                    .await?;
                tracing::info!(tenant = %tenant_id, ?pruned, "pruned");
            }
            done.push((tenant_id.into(), pruned));
        }
        Ok(done)
    }

    async fn prune_tenant(
        &self,
        tenant_id: Uuid,
        held: &Retention,
        batch: u64,
        now: DateTime<Utc>,
    ) -> DbResult<Pruned> {
        let mut pruned = Pruned {
            at: Some(now),
            ..Pruned::default()
        };
        let tasks: Vec<Uuid> = task::Entity::find()
            .select_only()
            .column(task::Column::Id)
            .filter(task::Column::TenantId.eq(tenant_id))
            .into_tuple()
            .all(&self.db)
            .await?;
        for task_id in tasks {
            self.prune_task(task_id, held, batch, now, &mut pruned)
                .await?;
        }
        if let Some(days) = held.audit_days {
            let before = id_at(days_before(now, days));
            loop {
                let ids: Vec<Uuid> = audit::Entity::find()
                    .select_only()
                    .column(audit::Column::Id)
                    .filter(audit::Column::TenantId.eq(tenant_id))
                    .filter(audit::Column::Id.lt(before))
                    .order_by_asc(audit::Column::Id)
                    .limit(batch)
                    .into_tuple()
                    .all(&self.db)
                    .await?;
                let deleted = audit::Entity::delete_many()
                    .filter(audit::Column::Id.is_in(ids.clone()))
                    .exec(&self.db)
                    .await?;
                pruned.audit_entries += deleted.rows_affected;
                if (ids.len() as u64) < batch {
                    break;
                }
            }
        }
        pruned.packages = self.prune_packages(tenant_id, now).await?;
        Ok(pruned)
    }

    /// Runs of one task past its horizons, then the lines of its runs past the log
    /// horizon.
    async fn prune_task(
        &self,
        task_id: Uuid,
        held: &Retention,
        batch: u64,
        now: DateTime<Utc>,
        pruned: &mut Pruned,
    ) -> DbResult<()> {
        let db = &self.db;
        let of_task = || {
            run::Entity::find()
                .select_only()
                .column(run::Column::Id)
                .filter(run::Column::TaskId.eq(task_id))
        };
        // The newest ended run stays (the task's `lastRun`); older ended runs may go.
        let newest: Option<Uuid> = of_task()
            .filter(run::Column::Status.is_in(ended()))
            .order_by_desc(run::Column::Id)
            .into_tuple()
            .one(db)
            .await?;
        let Some(newest) = newest else {
            return Ok(());
        };
        // Runs beyond the newest M: the (M+1)-th newest and older.
        let beyond_cap: Option<Uuid> = match held.runs_per_task {
            Some(m) => {
                of_task()
                    .order_by_desc(run::Column::Id)
                    .offset(u64::from(m))
                    .into_tuple()
                    .one(db)
                    .await?
            }
            None => None,
        };
        let mut past = Condition::any();
        if let Some(days) = held.run_days {
            past = past.add(run::Column::Id.lt(id_at(days_before(now, days))));
        }
        if let Some(cap) = beyond_cap {
            past = past.add(run::Column::Id.lte(cap));
        }
        if !past.is_empty() {
            loop {
                let ids: Vec<Uuid> = of_task()
                    .filter(run::Column::Status.is_in(ended()))
                    .filter(run::Column::Id.lt(newest))
                    .filter(past.clone())
                    .order_by_asc(run::Column::Id)
                    .limit(batch)
                    .into_tuple()
                    .all(db)
                    .await?;
                pruned.log_lines += delete_lines(db, &ids, batch).await?;
                let deleted = run::Entity::delete_many()
                    .filter(run::Column::Id.is_in(ids.clone()))
                    .exec(db)
                    .await?;
                pruned.runs += deleted.rows_affected;
                if (ids.len() as u64) < batch {
                    break;
                }
            }
        }
        if let Some(days) = held.log_days {
            let before = id_at(days_before(now, days));
            loop {
                // Walks the index of runs whose lines are kept (`ix_runs_lines_kept`).
                let ids: Vec<Uuid> = of_task()
                    .filter(run::Column::LogsPrunedAt.is_null())
                    .filter(run::Column::Id.lt(before))
                    .filter(run::Column::Id.lt(newest))
                    .filter(run::Column::Status.is_in(ended()))
                    .order_by_asc(run::Column::Id)
                    .limit(batch)
                    .into_tuple()
                    .all(db)
                    .await?;
                pruned.log_lines += delete_lines(db, &ids, batch).await?;
                run::Entity::update_many()
                    .col_expr(run::Column::LogsPrunedAt, Expr::value(now))
                    .filter(run::Column::Id.is_in(ids.clone()))
                    .exec(db)
                    .await?;
                if (ids.len() as u64) < batch {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Packages of the tenant, uploaded over a day ago, that neither a task nor any
    /// version of one refers to.
    async fn prune_packages(&self, tenant_id: Uuid, now: DateTime<Utc>) -> DbResult<u64> {
        let db = &self.db;
        let unused: Vec<String> = package::Entity::find()
            .select_only()
            .column(package::Column::Sha256)
            .filter(package::Column::TenantId.eq(tenant_id))
            .filter(package::Column::CreatedAt.lt(now - PACKAGE_GRACE))
            .filter(
                package::Column::Sha256.not_in_subquery(
                    Query::select()
                        .column(task::Column::PackageSha256)
                        .from(task::Entity)
                        .and_where(task::Column::TenantId.eq(tenant_id))
                        .and_where(task::Column::PackageSha256.is_not_null())
                        .take(),
                ),
            )
            .into_tuple()
            .all(db)
            .await?;
        let mut deleted = 0;
        for sha in unused {
            // A version's spec names its package by its digest (hex: nothing to escape).
            let referenced = task_version::Entity::find()
                .select_only()
                .column(task_version::Column::TaskId)
                .filter(
                    task_version::Column::TaskId.in_subquery(
                        Query::select()
                            .column(task::Column::Id)
                            .from(task::Entity)
                            .and_where(task::Column::TenantId.eq(tenant_id))
                            .take(),
                    ),
                )
                .filter(Expr::cust_with_values(
                    "CAST(spec AS TEXT) LIKE $1",
                    [format!("%{sha}%")],
                ))
                .into_tuple::<Uuid>()
                .one(db)
                .await?
                .is_some();
            if referenced {
                continue;
            }
            deleted += package::Entity::delete_many()
                .filter(package::Column::TenantId.eq(tenant_id))
                .filter(package::Column::Sha256.eq(sha))
                .exec(db)
                .await?
                .rows_affected;
        }
        Ok(deleted)
    }
}

/// Deletes the lines of `runs`, at most `batch` per statement; how many.
async fn delete_lines(db: &impl ConnectionTrait, runs: &[Uuid], batch: u64) -> DbResult<u64> {
    use sea_orm::sea_query::ExprTrait;
    if runs.is_empty() {
        return Ok(0);
    }
    let mut deleted = 0;
    loop {
        let some = Query::select()
            .columns([run_log_line::Column::RunId, run_log_line::Column::Offset])
            .from(run_log_line::Entity)
            .and_where(run_log_line::Column::RunId.is_in(runs.to_vec()))
            .limit(batch)
            .take();
        let rows = run_log_line::Entity::delete_many()
            .filter(
                Expr::tuple([
                    Expr::col(run_log_line::Column::RunId),
                    Expr::col(run_log_line::Column::Offset),
                ])
                .in_subquery(some),
            )
            .exec(db)
            .await?
            .rows_affected;
        deleted += rows;
        if rows < batch {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_made_before_a_moment_is_below_that_moments_floor() {
        let at = Utc::now();
        let before = Uuid::now_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let floor = id_at(Utc::now());
        assert!(before < floor);
        assert!(id_at(at - chrono::Duration::days(1)) < before);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(Uuid::now_v7() > floor);
    }
}
