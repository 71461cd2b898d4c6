//! Runs: one record per fire claimed, manual run queued, or retry. Users read and
//! control their tenant's runs here; workers write through their cluster's handle
//! (`claims`, `reports`); the scheduler hands queued runs out and marks a vanished
//! worker's runs LOST (`commands`, `lost`).
//!
//! Exactly once per fire: a scheduled run's `fire_at` equals its `scheduled_at`, and
//! (task, fire_at, attempt) is unique, so the insert of a claim is the one place that
//! decides which claim of a fire wins. Ingest is idempotent: a log line is keyed by
//! (run, offset) and an outcome only lands on a run that has none.

mod claims;
mod commands;
mod expiry;
mod lost;
pub mod machine;
mod reports;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId, WorkerId};
use cloudtask_core::roles::Action;
use cloudtask_core::run::{RunReason, RunStatus, RunTrigger};
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};
use uuid::Uuid;

use crate::entities::{run, task};
use crate::error::DbResult;
use crate::live_events::{Event, Outgoing};
use crate::mirror_changes::notify;
use crate::{Page, PageRequest, TenantHandle, now};
pub use commands::PendingCommands;
pub use machine::{RunEvent, Step};

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub tenant_id: TenantId,
    pub task_id: TaskId,
    pub cluster_id: ClusterId,
    pub task_version: u32,
    pub trigger: RunTrigger,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    pub status: RunStatus,
    pub worker: Option<WorkerId>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    /// Why it ended as it did, when the status alone does not say (e.g. the limit).
    pub reason: Option<RunReason>,
    pub created_at: DateTime<Utc>,
    /// When retention deleted its lines (its outcome is kept).
    pub logs_pruned_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub task_id: Option<TaskId>,
    pub status: Option<RunStatus>,
}

impl TryFrom<run::Model> for Run {
    type Error = Error;

    fn try_from(m: run::Model) -> Result<Self> {
        let bad = |what: &str, value: &str| {
            Error::internal(format!("stored run {}: bad {what} {value:?}", m.id))
        };
        Ok(Run {
            id: m.id.into(),
            tenant_id: m.tenant_id.into(),
            task_id: m.task_id.into(),
            cluster_id: m.cluster_id.into(),
            task_version: m.task_version as u32,
            trigger: RunTrigger::parse(&m.trigger).ok_or_else(|| bad("trigger", &m.trigger))?,
            scheduled_at: m.scheduled_at,
            attempt: m.attempt as u32,
            status: RunStatus::parse(&m.status).ok_or_else(|| bad("status", &m.status))?,
            worker: match &m.worker_id {
                Some(w) => Some(w.parse().map_err(|_| bad("worker", w))?),
                None => None,
            },
            started_at: m.started_at,
            finished_at: m.finished_at,
            exit_code: m.exit_code,
            signal: m.signal,
            error: m.error,
            reason: m.reason.as_deref().and_then(RunReason::parse),
            created_at: m.created_at,
            logs_pruned_at: m.logs_pruned_at,
        })
    }
}

/// A new run of `task`, born of `event` (a queue, a claim, a record of a fire not run:
/// the state machine gives its status). `attempt` is given for scheduled fires and their
/// retries, whose `fire_at` (the unique key's) is the scheduled time; a manual run (None)
/// has no fire.
fn new_run(
    task: &task::Model,
    trigger: RunTrigger,
    event: &RunEvent,
    scheduled_at: DateTime<Utc>,
    attempt: Option<i32>,
    worker: Option<&WorkerId>,
    now: DateTime<Utc>,
) -> run::ActiveModel {
    let (status, reason) = match machine::step(None, event) {
        Step::To(status, reason) => (status, reason),
        other => unreachable!("{event:?} creates no run: {other:?}"),
    };
    run::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(task.tenant_id),
        task_id: Set(task.id),
        cluster_id: Set(task.cluster_id),
        task_version: Set(task.version),
        trigger: Set(trigger.as_str().into()),
        scheduled_at: Set(scheduled_at),
        fire_at: Set(attempt.map(|_| scheduled_at)),
        attempt: Set(attempt.unwrap_or(0)),
        status: Set(status.as_str().into()),
        worker_id: Set(worker.map(|w| w.to_string())),
        started_at: Set(None),
        finished_at: Set(None),
        exit_code: Set(None),
        signal: Set(None),
        error: Set(None),
        created_at: Set(now),
        stop_requested_at: Set(None),
        reason: Set(reason.map(|r| r.as_str().to_owned())),
        logs_pruned_at: Set(None),
    }
}

/// Runs a user is shown in lists: all but fires claimed and not started yet.
fn started_or_not_running() -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(run::Column::Status.ne(RunStatus::Running.as_str()))
        .add(run::Column::StartedAt.is_not_null())
}

impl Run {
    /// A fire claimed ahead of its time whose process has not started (RUNNING with no
    /// `started_at`): not listed, nor announced, until it starts.
    pub fn is_claimed_only(&self) -> bool {
        self.status == RunStatus::Running && self.started_at.is_none()
    }
}

fn run_event(row: &run::Model) -> Event {
    Event::Run {
        tenant: row.tenant_id.into(),
        task: row.task_id.into(),
        run: row.id.into(),
    }
}

/// Tasks by id out of `tasks` (a scoped finder), each read once.
async fn tasks_by_id(
    conn: &impl ConnectionTrait,
    tasks: Select<task::Entity>,
    ids: impl Iterator<Item = Uuid>,
) -> DbResult<HashMap<Uuid, task::Model>> {
    let mut ids: Vec<Uuid> = ids.collect();
    ids.sort();
    ids.dedup();
    Ok(tasks
        .filter(task::Column::Id.is_in(ids))
        .all(conn)
        .await?
        .into_iter()
        .map(|t| (t.id, t))
        .collect())
}

impl TenantHandle {
    async fn run_model(&self, conn: &impl ConnectionTrait, id: RunId) -> DbResult<run::Model> {
        Ok(self
            .find::<run::Entity>()
            .filter(run::Column::Id.eq(Uuid::from(id)))
            .one(conn)
            .await?
            .ok_or(Error::NotFound("run"))?)
    }

    /// Queues a manual run of the task; the scheduler hands it to the task's worker.
    pub async fn queue_run(&self, task_id: TaskId) -> Result<Run> {
        let row = self
            .scoped(Action::RunTask, async |txn| {
                let task = self.task_model(txn, task_id).await?;
                let now = now();
                let queued = new_run(
                    &task,
                    RunTrigger::Manual,
                    &RunEvent::Queue,
                    now,
                    None,
                    None,
                    now,
                );
                let row = run::Entity::insert(queued).exec_with_returning(txn).await?;
                self.audit(txn, "runTaskNow", "run", RunId::from(row.id))
                    .await?;
                notify(txn, task.cluster_id.into()).await?;
                Ok(row)
            })
            .await?;
        self.publish_run(&row);
        row.try_into()
    }

    /// Stops a run: a queued one at once, a running one through its worker (the run
    /// turns STOPPED when the worker reports it). A run that has ended is a CONFLICT.
    pub async fn request_stop(&self, run_id: RunId) -> Result<Run> {
        let row = self
            .scoped(Action::StopRun, async |txn| {
                let row = self.run_model(txn, run_id).await?;
                let now = now();
                let update = run::Entity::update_many()
                    .filter(self.within::<run::Entity>())
                    .filter(run::Column::Id.eq(row.id));
                let update = match machine::step(RunStatus::parse(&row.status), &RunEvent::Stop) {
                    Step::To(status, reason) => update
                        .col_expr(run::Column::Status, Expr::value(status.as_str()))
                        .col_expr(run::Column::Reason, Expr::value(reason.map(|r| r.as_str())))
                        .col_expr(run::Column::FinishedAt, Expr::value(now))
                        .col_expr(run::Column::Error, Expr::value("stopped before it started"))
                        .filter(run::Column::Status.eq(row.status.as_str())),
                    Step::StopRequested => update
                        .col_expr(run::Column::StopRequestedAt, Expr::value(now))
                        .filter(run::Column::Status.eq(row.status.as_str())),
                    Step::Refuse(why) => Err(Error::Conflict(why.into()))?,
                    Step::Ignore => Err(Error::Conflict("the run has ended already".into()))?,
                };
                update.exec(txn).await?;
                self.audit(txn, "stopRun", "run", run_id).await?;
                notify(txn, row.cluster_id.into()).await?;
                self.run_model(txn, run_id).await
            })
            .await?;
        self.publish_run(&row);
        row.try_into()
    }

    /// Announces a run written by this handle, once its transaction has committed.
    fn publish_run(&self, row: &run::Model) {
        let mut events = Outgoing::default();
        events.add(run_event(row));
        events.publish(&self.db, &self.hub);
    }

    /// Runs of the tenant, newest first. A fire claimed but not started yet (claimed ahead
    /// of its time; it may still be given up, or dropped as not due) is not listed until
    /// its start is reported.
    pub async fn runs(&self, filter: &RunFilter, request: PageRequest) -> Result<Page<Run>> {
        self.reading(Action::Read, async |txn| {
            let mut query = self.find::<run::Entity>().filter(started_or_not_running());
            if let Some(task_id) = filter.task_id {
                query = query.filter(run::Column::TaskId.eq(Uuid::from(task_id)));
            }
            if let Some(status) = filter.status {
                query = query.filter(run::Column::Status.eq(status.as_str()));
            }
            if let Some(after) = request.after {
                query = query.filter(run::Column::Id.lt(after));
            }
            let rows = query
                .order_by_desc(run::Column::Id)
                .limit(request.limit())
                .all(txn)
                .await?;
            let page = request.page(rows);
            let items = page
                .items
                .into_iter()
                .map(Run::try_from)
                .collect::<Result<Vec<_>>>()?;
            Ok(Page {
                items,
                has_next: page.has_next,
            })
        })
        .await
    }

    pub async fn run(&self, id: RunId) -> Result<Run> {
        self.reading(Action::Read, async |txn| {
            Ok(self.run_model(txn, id).await?.try_into()?)
        })
        .await
    }

    /// The task's latest run (by creation), if it has any.
    pub async fn last_run(&self, task_id: TaskId) -> Result<Option<Run>> {
        self.reading(Action::Read, async |txn| {
            let row = self
                .find::<run::Entity>()
                .filter(run::Column::TaskId.eq(Uuid::from(task_id)))
                .filter(started_or_not_running())
                .order_by_desc(run::Column::Id)
                .one(txn)
                .await?;
            Ok(row.map(Run::try_from).transpose()?)
        })
        .await
    }
}
