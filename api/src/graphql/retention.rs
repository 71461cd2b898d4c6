//! How long the tenant's history is kept: `retention` (any member) and `setRetention`
//! (ADMIN and above), within the platform's horizons (`retention_*` settings).

use async_graphql::{Context, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::RetentionSettings;
use cloudtask_core::retention::{Pruned, Retention};

use super::{state, tenant};
use crate::error::{ApiError, ApiResult};

#[derive(Default)]
pub struct RetentionQuery;

#[Object]
impl RetentionQuery {
    /// How long the tenant's runs, their lines and its audit entries are kept, and what
    /// pruning deleted last.
    async fn retention(&self, ctx: &Context<'_>) -> ApiResult<RetentionSettingsObj> {
        let platform = state(ctx).config.retention();
        Ok(RetentionSettingsObj(
            tenant(ctx).await?.retention(&platform).await?,
        ))
    }
}

#[derive(Default)]
pub struct RetentionMutation;

#[Object]
impl RetentionMutation {
    /// Sets the tenant's own horizons (ADMIN and above). Each may be at most the
    /// platform's; one left null is the platform's.
    async fn set_retention(
        &self,
        ctx: &Context<'_>,
        input: RetentionInput,
    ) -> ApiResult<RetentionSettingsObj> {
        let platform = state(ctx).config.retention();
        let handle = tenant(ctx).await?;
        handle.set_retention(input.try_into()?, &platform).await?;
        Ok(RetentionSettingsObj(handle.retention(&platform).await?))
    }
}

/// A tenant's horizons; null where none is set.
#[derive(InputObject)]
pub struct RetentionInput {
    /// Runs created more than this many days ago are deleted with their lines.
    pub run_days: Option<i32>,
    /// Runs of a task beyond its newest this many are deleted with their lines.
    pub runs_per_task: Option<i32>,
    /// The lines of runs created more than this many days ago are deleted; the runs
    /// and their outcomes stay.
    pub log_days: Option<i32>,
    /// Audit entries older than this many days are deleted.
    pub audit_days: Option<i32>,
}

impl TryFrom<RetentionInput> for Retention {
    type Error = ApiError;

    fn try_from(input: RetentionInput) -> Result<Self, ApiError> {
        let count = |field: &str, value: Option<i32>| {
            value
                .map(|v| {
                    u32::try_from(v).map_err(|_| {
                        ApiError::from(cloudtask_core::Error::bad_input(
                            field,
                            "must not be negative",
                        ))
                    })
                })
                .transpose()
        };
        Ok(Retention {
            run_days: count("runDays", input.run_days)?,
            runs_per_task: count("runsPerTask", input.runs_per_task)?,
            log_days: count("logDays", input.log_days)?,
            audit_days: count("auditDays", input.audit_days)?,
        })
    }
}

/// Horizons of history; null: none.
#[derive(SimpleObject)]
#[graphql(name = "RetentionHorizons")]
pub struct Horizons {
    pub run_days: Option<u32>,
    pub runs_per_task: Option<u32>,
    pub log_days: Option<u32>,
    pub audit_days: Option<u32>,
}

impl From<Retention> for Horizons {
    fn from(r: Retention) -> Self {
        Horizons {
            run_days: r.run_days,
            runs_per_task: r.runs_per_task,
            log_days: r.log_days,
            audit_days: r.audit_days,
        }
    }
}

/// What one pruning pass deleted of the tenant's history.
#[derive(SimpleObject)]
#[graphql(name = "PruneReport")]
pub struct PruneReport {
    pub at: Option<DateTime<Utc>>,
    pub runs: u64,
    pub log_lines: u64,
    pub audit_entries: u64,
    pub packages: u64,
}

impl From<Pruned> for PruneReport {
    fn from(p: Pruned) -> Self {
        PruneReport {
            at: p.at,
            runs: p.runs,
            log_lines: p.log_lines,
            audit_entries: p.audit_entries,
            packages: p.packages,
        }
    }
}

pub struct RetentionSettingsObj(pub RetentionSettings);

#[Object(name = "RetentionSettings")]
impl RetentionSettingsObj {
    /// What holds: the tenant's own horizons, each within the platform's.
    async fn held(&self) -> Horizons {
        self.0.held.into()
    }
    /// The tenant's own choice (null: the platform's).
    async fn own(&self) -> Horizons {
        self.0.own.into()
    }
    /// The platform's horizons: the longest a tenant may keep.
    async fn platform(&self) -> Horizons {
        self.0.platform.into()
    }
    /// What the last pruning pass that deleted anything deleted, and when; null until
    /// one has.
    async fn last_prune(&self) -> Option<PruneReport> {
        self.0.last_prune.map(Into::into)
    }
}
