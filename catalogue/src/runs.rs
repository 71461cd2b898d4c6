//! Runs and their log lines. Workers write through the cluster their credential names
//! (claims, log batches, outcomes); the scheduler marks a vanished worker's runs LOST;
//! users read through their tenant handle.
//!
//! Exactly once per fire: a scheduled run's `fire_at` equals its `scheduled_at`, and
//! (task, fire_at, attempt) is unique, so the insert of a claim is the one place that
//! decides which claim of a fire wins. Ingest is idempotent: a log line is keyed by
//! (run, offset) and an outcome only lands on a run that has none.

use std::borrow::Borrow;
use std::collections::HashMap;

use cloudtask_core::ids::{ClusterId, RunId, TaskId};
use cloudtask_core::roles::Action;
use cloudtask_core::run::{Claim, LogLine, Outcome, Report, RunStatus, RunTrigger};
use cloudtask_core::task::TaskState;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use crate::changes::notify;
use crate::entities::{run, run_log_line, task};
use crate::events::{Event, Outgoing};
use crate::notifications;
use crate::records::Run;
use crate::tenant::TenantHandle;
use crate::{Catalogue, MAX_PAGE, Page, PageRequest, db_err, now};

/// Most log lines one request may carry.
pub const MAX_LOG_BATCH: usize = 5_000;

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub task_id: Option<TaskId>,
    pub status: Option<RunStatus>,
}

impl Catalogue {
    /// Records a claim of one fire by a worker of `cluster_id`: a RUNNING run (the worker
    /// may start the process) or a SKIPPED one. Refused with CONFLICT when the fire is
    /// claimed already, the task is paused, or the worker's spec is not the current version;
    /// NOT_FOUND when the task is not in this cluster.
    pub async fn claim_run(&self, cluster_id: ClusterId, claim: &Claim) -> Result<Run> {
        self.claim_runs(cluster_id, std::slice::from_ref(claim))
            .await?
            .pop()
            .expect("one answer per claim")
    }

    /// Claims of many fires (a worker claims a second's fires at once) in one
    /// transaction and one insert; each is answered as [`Catalogue::claim_run`] would
    /// answer it alone. The outer error is the database's: nothing was recorded.
    pub async fn claim_runs(
        &self,
        cluster_id: ClusterId,
        claims: &[Claim],
    ) -> Result<Vec<Result<Run>>> {
        let mut answers: Vec<Option<Result<Run>>> = claims
            .iter()
            .map(|claim| check_claim(claim).err().map(Err))
            .collect();
        let txn = self.db.begin().await.map_err(db_err)?;
        let tasks = tasks_by_id(
            &txn,
            claims.iter().map(|c| c.task_id.into()),
            Some(cluster_id),
        )
        .await?;
        let now = now();
        let mut models = Vec::new();
        for (claim, answer) in claims.iter().zip(answers.iter_mut()) {
            if answer.is_some() {
                continue;
            }
            let Some(task) = tasks.get(&claim.task_id.into()) else {
                *answer = Some(Err(Error::NotFound("task")));
                continue;
            };
            match claimable(task, claim) {
                Ok(()) => models.push(claim_row(task, claim, now)),
                Err(e) => *answer = Some(Err(e)),
            }
        }
        // One order for every batch's key locks: two batches taking the same fires
        // (a new owner's claims, the old owner's records) must not deadlock.
        models.sort_by_key(|m| {
            (
                m.task_id.clone().unwrap(),
                m.fire_at.clone().unwrap(),
                m.attempt.clone().unwrap(),
            )
        });
        let inserted = if models.is_empty() {
            Vec::new()
        } else {
            let result = run::Entity::insert_many(models)
                .on_conflict_do_nothing_on([
                    run::Column::TaskId,
                    run::Column::FireAt,
                    run::Column::Attempt,
                ])
                .exec_with_returning_many(&txn)
                .await;
            // ON CONFLICT DO NOTHING returns no row for a fire claimed already.
            match result {
                Ok(sea_orm::TryInsertResult::Inserted(rows)) => rows,
                Ok(_) | Err(sea_orm::DbErr::RecordNotFound(_)) => Vec::new(),
                Err(e) => {
                    txn.rollback().await.map_err(db_err)?;
                    return Err(db_err(e));
                }
            }
        };
        let mut inserted: HashMap<(Uuid, i64, i32), run::Model> = inserted
            .into_iter()
            .filter_map(|row| {
                let key = (row.task_id, row.fire_at?.timestamp_micros(), row.attempt);
                Some((key, row))
            })
            .collect();
        let mut events = Outgoing::default();
        for (claim, answer) in claims.iter().zip(answers.iter_mut()) {
            if answer.is_some() {
                continue;
            }
            let key = (
                Uuid::from(claim.task_id),
                claim.scheduled_at.timestamp_micros(),
                claim.attempt as i32,
            );
            // A fire in the batch twice: the first takes the row, the second is a claim
            // of a fire claimed already.
            *answer = Some(match inserted.remove(&key) {
                Some(row) => {
                    events.add(run_event(&row));
                    row.try_into()
                }
                None => match claimed_already(&txn, claim, now).await {
                    Ok(Some(row)) => {
                        if row.status != RunStatus::Running.as_str() {
                            events.add(run_event(&row));
                        }
                        row.try_into()
                    }
                    Ok(None) => Err(Error::Conflict("this fire is claimed already".into())),
                    Err(e) => {
                        txn.rollback().await.map_err(db_err)?;
                        return Err(e);
                    }
                },
            });
        }
        txn.commit().await.map_err(db_err)?;
        events.publish(&self.db, &self.hub);
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every claim answered"))
            .collect())
    }

    /// Stores a batch of reports (log lines and outcomes of any runs of the cluster) in
    /// one transaction, with the same idempotence as one by one. Reports for runs that
    /// are not this cluster's are ignored (and logged): they can never be delivered.
    pub async fn ingest_reports(&self, cluster_id: ClusterId, reports: &[Report]) -> Result<()> {
        let lines: usize = reports
            .iter()
            .map(|r| match r {
                Report::Logs { lines, .. } => lines.len(),
                Report::Started { .. } | Report::Abandon { .. } | Report::Finish { .. } => 1,
            })
            .sum();
        if lines > MAX_LOG_BATCH {
            return Err(Error::bad_input(
                "reports",
                format!("at most {MAX_LOG_BATCH} lines and outcomes per batch"),
            ));
        }
        let mut runs: Vec<Uuid> = reports.iter().map(|r| r.run().into()).collect();
        runs.sort();
        runs.dedup();
        let txn = self.db.begin().await.map_err(db_err)?;
        let known: std::collections::HashSet<Uuid> = run::Entity::find()
            .select_only()
            .column(run::Column::Id)
            .filter(run::Column::Id.is_in(runs))
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .into_tuple::<Uuid>()
            .all(&txn)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
        let mut rows = Vec::new();
        // Per run, the offset after its last line in this batch (for subscribers).
        let mut stored: Vec<(RunId, u64)> = Vec::new();
        for report in reports {
            if !known.contains(&report.run().into()) {
                tracing::warn!(run = %report.run(), %cluster_id, "ignoring a report for an unknown run");
                continue;
            }
            if let Report::Logs { run, lines } = report {
                rows.extend(lines.iter().map(|line| log_row(*run, line)));
                if let Some(next) = lines.iter().map(|l| l.offset + 1).max() {
                    match stored.iter_mut().find(|(r, _)| r == run) {
                        Some((_, n)) => *n = (*n).max(next),
                        None => stored.push((*run, next)),
                    }
                }
            }
        }
        let mut events = Outgoing::default();
        for (run, next) in stored {
            events.add(Event::Logs { run, next });
        }
        for chunk in rows.chunks(1_000) {
            run_log_line::Entity::insert_many(chunk.to_vec())
                .on_conflict_do_nothing_on([
                    run_log_line::Column::RunId,
                    run_log_line::Column::Offset,
                ])
                .exec_without_returning(&txn)
                .await
                .map_err(db_err)?;
        }
        let mut abandoned = Vec::new();
        let mut started = Vec::new();
        let mut finished = Vec::new();
        for report in reports {
            if !known.contains(&report.run().into()) {
                continue;
            }
            match report {
                Report::Abandon { run, reason } => abandoned.push((*run, reason.as_str())),
                Report::Started { run, at } => started.push((*run, *at)),
                Report::Finish { run, outcome } => {
                    if !outcome.status.is_final() || outcome.status == RunStatus::Skipped {
                        txn.rollback().await.map_err(db_err)?;
                        return Err(Error::bad_input("status", "not an outcome"));
                    }
                    finished.push((*run, outcome));
                }
                Report::Logs { .. } => {}
            }
        }
        for chunk in abandoned.chunks(UPDATE_CHUNK) {
            for row in abandon(&txn, chunk).await? {
                events.add(run_event(&row));
            }
        }
        for chunk in started.chunks(UPDATE_CHUNK) {
            mark_started(&txn, chunk).await?;
        }
        for chunk in finished.chunks(UPDATE_CHUNK) {
            for row in finish_many(&txn, chunk).await? {
                events.add(run_event(&row));
                notifications::run_ended(&txn, &row).await?;
            }
        }
        events.notify_within(&txn).await?;
        txn.commit().await.map_err(db_err)?;
        events.publish(&self.db, &self.hub);
        Ok(())
    }

    /// The scheduler's verdict on a worker whose session ended without a clean leave:
    /// its unfinished runs are LOST. Returns how many.
    pub async fn mark_worker_runs_lost(&self, cluster_id: ClusterId, worker: &str) -> Result<u64> {
        let txn = self.db.begin().await.map_err(db_err)?;
        let lost = run::Entity::find()
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .filter(run::Column::WorkerId.eq(worker))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .all(&txn)
            .await
            .map_err(db_err)?;
        let now = now();
        run::Entity::update_many()
            .col_expr(run::Column::Status, Expr::value(RunStatus::Lost.as_str()))
            .col_expr(run::Column::FinishedAt, Expr::value(now))
            .col_expr(run::Column::Error, Expr::value(LOST_REASON))
            .filter(run::Column::Id.is_in(lost.iter().map(|r| r.id)))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        let mut events = Outgoing::default();
        for run in &lost {
            let ended = run::Model {
                status: RunStatus::Lost.as_str().into(),
                finished_at: Some(now),
                error: Some(LOST_REASON.into()),
                ..run.clone()
            };
            events.add(run_event(&ended));
            notifications::run_ended(&txn, &ended).await?;
        }
        // The retry policy decides what a lost fire becomes: its next attempt is queued
        // for the task's next owner (the unique key keeps it single).
        for run in &lost {
            if run.fire_at.is_none() {
                continue; // manual runs are not retried
            }
            let Some(task) = task::Entity::find_by_id(run.task_id)
                .one(&txn)
                .await
                .map_err(db_err)?
            else {
                continue;
            };
            let spec = crate::decode_spec(task.spec.clone())?;
            if task.state == TaskState::Paused.as_str() || run.attempt as u32 >= spec.max_retries {
                continue;
            }
            let retry = new_run(
                &task,
                RunTrigger::Retry,
                RunStatus::Queued,
                run.scheduled_at,
                Some(run.attempt + 1),
                None,
                now,
            );
            let retry_event = Event::Run {
                tenant: task.tenant_id.into(),
                task: task.id.into(),
                run: retry.id.clone().unwrap().into(),
            };
            let inserted = run::Entity::insert(retry)
                .on_conflict_do_nothing_on([
                    run::Column::TaskId,
                    run::Column::FireAt,
                    run::Column::Attempt,
                ])
                .exec_without_returning(&txn)
                .await
                .map_err(db_err)?;
            if matches!(inserted, sea_orm::TryInsertResult::Inserted(n) if n > 0) {
                events.add(retry_event);
            }
        }
        // Manual runs handed to it but not started go back to the queue, for the task's
        // next owner.
        run::Entity::update_many()
            .col_expr(run::Column::WorkerId, Expr::value(Option::<String>::None))
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .filter(run::Column::WorkerId.eq(worker))
            .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        events.publish(&self.db, &self.hub);
        Ok(lost.len() as u64)
    }

    /// What the leader has to deliver to a cluster's workers: manual runs waiting to
    /// start, and running runs a user asked to stop.
    pub async fn pending_commands(&self, cluster_id: ClusterId) -> Result<(Vec<Run>, Vec<Run>)> {
        let rows = run::Entity::find()
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .filter(
                run::Column::Status
                    .is_in([RunStatus::Queued.as_str(), RunStatus::Running.as_str()]),
            )
            .order_by_asc(run::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        let mut queued = Vec::new();
        let mut stops = Vec::new();
        for row in rows {
            let stop = row.stop_requested_at.is_some();
            let run = Run::try_from(row)?;
            match run.status {
                RunStatus::Queued => queued.push(run),
                _ if stop => stops.push(run),
                _ => {}
            }
        }
        Ok((queued, stops))
    }

    /// Notes which worker a queued run was handed to.
    pub async fn hand_queued_run(&self, run_id: RunId, worker: &str) -> Result<()> {
        run::Entity::update_many()
            .col_expr(run::Column::WorkerId, Expr::value(worker))
            .filter(run::Column::Id.eq(Uuid::from(run_id)))
            .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// A worker starts a queued manual run: QUEUED → RUNNING, once.
    pub async fn start_queued_run(
        &self,
        cluster_id: ClusterId,
        run_id: RunId,
        worker: &str,
    ) -> Result<Run> {
        let result = run::Entity::update_many()
            .col_expr(
                run::Column::Status,
                Expr::value(RunStatus::Running.as_str()),
            )
            .col_expr(run::Column::StartedAt, Expr::value(now()))
            .col_expr(run::Column::WorkerId, Expr::value(worker))
            .filter(run::Column::Id.eq(Uuid::from(run_id)))
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        if result.rows_affected == 0 {
            self.run_of_cluster(cluster_id, run_id).await?;
            return Err(Error::Conflict("the run is not queued any more".into()));
        }
        let run = self.run_of_cluster(cluster_id, run_id).await?;
        self.announce(Event::Run {
            tenant: run.tenant_id,
            task: run.task_id,
            run: run.id,
        });
        Ok(run)
    }

    /// Where a new owner of the task starts accounting for fires: the latest scheduled
    /// fire claimed so far, or the task's last change (creation, edit, resume) if later.
    /// Fires after it and before now were due while nobody could run them: misfires.
    pub async fn fire_cursor(
        &self,
        cluster_id: ClusterId,
        task_id: TaskId,
    ) -> Result<chrono::DateTime<chrono::Utc>> {
        let task = task::Entity::find_by_id(Uuid::from(task_id))
            .filter(task::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("task"))?;
        let last_fire = run::Entity::find()
            .filter(run::Column::TaskId.eq(task.id))
            .filter(run::Column::FireAt.is_not_null())
            .order_by_desc(run::Column::FireAt)
            .one(&self.db)
            .await
            .map_err(db_err)?
            .and_then(|r| r.fire_at);
        Ok(last_fire.map_or(task.updated_at, |fire| fire.max(task.updated_at)))
    }

    async fn run_of_cluster(&self, cluster_id: ClusterId, run_id: RunId) -> Result<Run> {
        run::Entity::find_by_id(Uuid::from(run_id))
            .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("run"))?
            .try_into()
    }
}

/// A new run of `task`. `attempt` is given for scheduled fires and their retries, whose
/// `fire_at` (the unique key's) is the scheduled time; a manual run (None) has no fire.
fn new_run(
    task: &task::Model,
    trigger: RunTrigger,
    status: RunStatus,
    scheduled_at: chrono::DateTime<chrono::Utc>,
    attempt: Option<i32>,
    worker: Option<String>,
    now: chrono::DateTime<chrono::Utc>,
) -> run::ActiveModel {
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
        worker_id: Set(worker),
        started_at: Set(None),
        finished_at: Set(None),
        exit_code: Set(None),
        signal: Set(None),
        error: Set(None),
        created_at: Set(now),
        stop_requested_at: Set(None),
    }
}

/// Tasks by id (of one cluster, when given), each read once.
async fn tasks_by_id(
    conn: &impl ConnectionTrait,
    ids: impl Iterator<Item = Uuid>,
    cluster_id: Option<ClusterId>,
) -> Result<HashMap<Uuid, task::Model>> {
    let mut ids: Vec<Uuid> = ids.collect();
    ids.sort();
    ids.dedup();
    let mut query = task::Entity::find().filter(task::Column::Id.is_in(ids));
    if let Some(cluster_id) = cluster_id {
        query = query.filter(task::Column::ClusterId.eq(Uuid::from(cluster_id)));
    }
    Ok(query
        .all(conn)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(|t| (t.id, t))
        .collect())
}

/// What a claim may ask for, before any look-up.
fn check_claim(claim: &Claim) -> Result<()> {
    if !matches!(claim.status, RunStatus::Running | RunStatus::Skipped) {
        return Err(Error::bad_input("status", "a claim is RUNNING or SKIPPED"));
    }
    if claim.trigger == RunTrigger::Manual {
        return Err(Error::bad_input(
            "trigger",
            "manual runs are queued by the API",
        ));
    }
    Ok(())
}

/// Whether the task takes the claim: a paused task runs nothing, and a fire it skipped
/// is recorded only if it was due before the pause (fires after it are not due at
/// all); a claim on a stale spec is refused.
fn claimable(task: &task::Model, claim: &Claim) -> Result<()> {
    if task.state == TaskState::Paused.as_str()
        && (claim.status == RunStatus::Running || claim.scheduled_at > task.updated_at)
    {
        return Err(Error::Conflict("the task is paused".into()));
    }
    if task.version as u32 != claim.task_version {
        return Err(Error::Conflict(format!(
            "stale task version {} (current {})",
            claim.task_version, task.version
        )));
    }
    Ok(())
}

/// The row a claim inserts. A RUNNING claim's start time comes with the worker's
/// Started report: a fire is claimed ahead of its time.
fn claim_row(
    task: &task::Model,
    claim: &Claim,
    now: chrono::DateTime<chrono::Utc>,
) -> run::ActiveModel {
    let running = claim.status == RunStatus::Running;
    run::ActiveModel {
        finished_at: Set((!running).then_some(now)),
        error: Set(claim.reason.clone()),
        ..new_run(
            task,
            claim.trigger,
            claim.status,
            claim.scheduled_at,
            Some(claim.attempt as i32),
            Some(claim.worker.clone()),
            now,
        )
    }
}

/// A claim of a fire that has its record already. The same worker asking again (its
/// first answer was lost on the way) gets the same run, as long as nothing has happened
/// to it yet; one that gave up on its claim (the answer never came) and records the
/// fire as missed turns the claim it did make into that record. None: refused.
async fn claimed_already(
    conn: &impl ConnectionTrait,
    claim: &Claim,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<run::Model>> {
    let existing = run::Entity::find()
        .filter(run::Column::TaskId.eq(Uuid::from(claim.task_id)))
        .filter(run::Column::FireAt.eq(claim.scheduled_at))
        .filter(run::Column::Attempt.eq(claim.attempt as i32))
        .one(conn)
        .await
        .map_err(db_err)?;
    let Some(existing) = existing.filter(|e| {
        e.worker_id.as_deref() == Some(claim.worker.as_str())
            && e.status == RunStatus::Running.as_str()
            && e.started_at.is_none()
    }) else {
        return Ok(None);
    };
    if claim.status == RunStatus::Running {
        return Ok(Some(existing));
    }
    let outcome = Outcome {
        status: RunStatus::Skipped,
        exit_code: None,
        signal: None,
        error: claim.reason.clone(),
        finished_at: now,
    };
    finish(conn, existing.id.into(), &outcome).await
}

fn log_row(run_id: RunId, line: &LogLine) -> run_log_line::ActiveModel {
    run_log_line::ActiveModel {
        run_id: Set(run_id.into()),
        offset: Set(line.offset as i64),
        stream: Set(line.stream.as_str().into()),
        at: Set(line.at),
        // Postgres text cannot hold NUL.
        line: Set(line.text.replace('\0', "\u{fffd}")),
    }
}

const LOST_REASON: &str = "the worker's session ended while the run was going";

/// Fires claimed ahead of their time and not started: a record goes when its fire was
/// not due after all (the task paused or deleted before it, or edited since the claim),
/// else it is a fire not run, SKIPPED with the worker's reason. Returns the rows that
/// ended SKIPPED.
async fn abandon(
    conn: &impl ConnectionTrait,
    abandoned: &[(RunId, &str)],
) -> Result<Vec<run::Model>> {
    let rows = run::Entity::find()
        .filter(run::Column::Id.is_in(abandoned.iter().map(|(r, _)| Uuid::from(*r))))
        .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
        .filter(run::Column::StartedAt.is_null())
        .filter(run::Column::Trigger.eq(RunTrigger::Schedule.as_str()))
        .all(conn)
        .await
        .map_err(db_err)?; // the others started, or ended already
    let tasks = tasks_by_id(conn, rows.iter().map(|r| r.task_id), None).await?;
    let (not_due, due): (Vec<run::Model>, Vec<run::Model>) = rows.into_iter().partition(|row| {
        tasks.get(&row.task_id).is_none_or(|t| {
            (t.state == TaskState::Paused.as_str() && row.scheduled_at > t.updated_at)
                || t.version != row.task_version
        })
    });
    if !not_due.is_empty() {
        run::Entity::delete_many()
            .filter(run::Column::Id.is_in(not_due.iter().map(|r| r.id)))
            .exec(conn)
            .await
            .map_err(db_err)?;
    }
    let now = now();
    let reasons: HashMap<Uuid, &str> = abandoned
        .iter()
        .map(|(run, reason)| (Uuid::from(*run), *reason))
        .collect();
    let outcomes: Vec<(RunId, Outcome)> = due
        .iter()
        .map(|row| {
            let outcome = Outcome {
                status: RunStatus::Skipped,
                exit_code: None,
                signal: None,
                error: reasons.get(&row.id).map(|r| (*r).to_owned()),
                finished_at: now,
            };
            (row.id.into(), outcome)
        })
        .collect();
    finish_many(conn, &outcomes).await
}

fn run_event(row: &run::Model) -> Event {
    Event::Run {
        tenant: row.tenant_id.into(),
        task: row.task_id.into(),
        run: row.id.into(),
    }
}

/// Runs updated by one statement in a batch: each column's value is a CASE over the run
/// ids, so the statement stays small enough to plan quickly.
const UPDATE_CHUNK: usize = 200;

/// `column = CASE id WHEN .. THEN .. END` over the runs of one batch.
fn per_run<X, T: Into<sea_orm::Value>>(
    runs: &[(RunId, X)],
    column: run::Column,
    value: impl Fn(&X) -> T,
) -> sea_orm::sea_query::SimpleExpr {
    let mut case = sea_orm::sea_query::CaseStatement::new();
    for (run, x) in runs {
        case = case.case(run::Column::Id.eq(Uuid::from(*run)), Expr::value(value(x)));
    }
    case.finally(Expr::col(column)).into()
}

fn ids<X>(runs: &[(RunId, X)]) -> impl Iterator<Item = Uuid> + '_ {
    runs.iter().map(|(run, _)| Uuid::from(*run))
}

/// Started reports: the start time lands on runs still going.
async fn mark_started(
    conn: &impl ConnectionTrait,
    started: &[(RunId, chrono::DateTime<chrono::Utc>)],
) -> Result<()> {
    run::Entity::update_many()
        .col_expr(
            run::Column::StartedAt,
            per_run(started, run::Column::StartedAt, |at| Some(*at)),
        )
        .filter(run::Column::Id.is_in(ids(started)))
        .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
        .exec(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// An outcome lands only on a run that has none yet; the ended run, if this one did.
async fn finish(
    conn: &impl ConnectionTrait,
    run_id: RunId,
    outcome: &Outcome,
) -> Result<Option<run::Model>> {
    Ok(finish_many(conn, &[(run_id, outcome)]).await?.pop())
}

/// Outcomes of many runs in one statement: each lands only on a run that has none yet.
/// Returns the runs that ended here. A run given twice takes its first outcome.
async fn finish_many(
    conn: &impl ConnectionTrait,
    outcomes: &[(RunId, impl Borrow<Outcome>)],
) -> Result<Vec<run::Model>> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    let column = |column: run::Column, value: fn(&Outcome) -> sea_orm::Value| {
        (column, per_run(outcomes, column, |o| value(o.borrow())))
    };
    let mut update = run::Entity::update_many();
    for (name, value) in [
        column(run::Column::Status, |o| o.status.as_str().into()),
        column(run::Column::ExitCode, |o| o.exit_code.into()),
        column(run::Column::Signal, |o| o.signal.into()),
        column(run::Column::Error, |o| o.error.clone().into()),
        column(run::Column::FinishedAt, |o| Some(o.finished_at).into()),
    ] {
        update = update.col_expr(name, value);
    }
    update
        .filter(run::Column::Id.is_in(ids(outcomes)))
        .filter(
            run::Column::Status.is_in([RunStatus::Queued.as_str(), RunStatus::Running.as_str()]),
        )
        .exec_with_returning(conn)
        .await
        .map_err(db_err)
}

impl TenantHandle {
    fn tenant_uuid(&self) -> Uuid {
        self.tenant_id().into()
    }

    /// Queues a manual run of the task; the scheduler hands it to the task's worker.
    pub async fn queue_run(&self, task_id: TaskId) -> Result<Run> {
        self.require(Action::RunTask)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let task = task::Entity::find_by_id(Uuid::from(task_id))
            .filter(task::Column::TenantId.eq(self.tenant_uuid()))
            .one(&txn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("task"))?;
        let now = now();
        let row = run::Entity::insert(new_run(
            &task,
            RunTrigger::Manual,
            RunStatus::Queued,
            now,
            None,
            None,
            now,
        ))
        .exec_with_returning(&txn)
        .await
        .map_err(db_err)?;
        self.audit(&txn, "runTaskNow", "run", RunId::from(row.id))
            .await?;
        notify(&txn, task.cluster_id.into()).await?;
        let mut events = Outgoing::default();
        events.add(run_event(&row));
        txn.commit().await.map_err(db_err)?;
        events.publish(&self.db, &self.hub);
        row.try_into()
    }

    /// Stops a run: a queued one at once, a running one through its worker (the run
    /// turns STOPPED when the worker reports it). A run that has ended is a CONFLICT.
    pub async fn request_stop(&self, run_id: RunId) -> Result<Run> {
        self.require(Action::StopRun)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let row = run::Entity::find_by_id(Uuid::from(run_id))
            .filter(run::Column::TenantId.eq(self.tenant_uuid()))
            .one(&txn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("run"))?;
        let now = now();
        let update = run::Entity::update_many().filter(run::Column::Id.eq(row.id));
        let update = match RunStatus::parse(&row.status) {
            Some(RunStatus::Queued) => update
                .col_expr(
                    run::Column::Status,
                    Expr::value(RunStatus::Stopped.as_str()),
                )
                .col_expr(run::Column::FinishedAt, Expr::value(now))
                .col_expr(run::Column::Error, Expr::value("stopped before it started")),
            Some(RunStatus::Running) => {
                update.col_expr(run::Column::StopRequestedAt, Expr::value(now))
            }
            _ => {
                txn.rollback().await.map_err(db_err)?;
                return Err(Error::Conflict("the run has ended already".into()));
            }
        };
        update.exec(&txn).await.map_err(db_err)?;
        self.audit(&txn, "stopRun", "run", run_id).await?;
        notify(&txn, row.cluster_id.into()).await?;
        let run = run::Entity::find_by_id(row.id)
            .one(&txn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("run"))?;
        let mut events = Outgoing::default();
        events.add(run_event(&run));
        txn.commit().await.map_err(db_err)?;
        events.publish(&self.db, &self.hub);
        run.try_into()
    }

    /// Runs of the tenant, newest first.
    pub async fn runs(&self, filter: &RunFilter, request: PageRequest) -> Result<Page<Run>> {
        self.require(Action::Read)?;
        let mut query = run::Entity::find().filter(run::Column::TenantId.eq(self.tenant_uuid()));
        if let Some(task_id) = filter.task_id {
            query = query.filter(run::Column::TaskId.eq(Uuid::from(task_id)));
        }
        if let Some(status) = filter.status {
            query = query.filter(run::Column::Status.eq(status.as_str()));
        }
        if let Some(after) = request.after {
            query = query.filter(run::Column::Id.lt(after));
        }
        let first = request.first.min(MAX_PAGE);
        let rows = query
            .order_by_desc(run::Column::Id)
            .limit(first + 1)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        let has_next = rows.len() as u64 > first;
        let items = rows
            .into_iter()
            .take(first as usize)
            .map(Run::try_from)
            .collect::<Result<Vec<_>>>()?;
        Ok(Page { items, has_next })
    }

    pub async fn run(&self, id: RunId) -> Result<Run> {
        self.require(Action::Read)?;
        run::Entity::find_by_id(Uuid::from(id))
            .filter(run::Column::TenantId.eq(self.tenant_uuid()))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("run"))?
            .try_into()
    }

    /// The task's latest run (by creation), if it has any.
    pub async fn last_run(&self, task_id: TaskId) -> Result<Option<Run>> {
        self.require(Action::Read)?;
        run::Entity::find()
            .filter(run::Column::TenantId.eq(self.tenant_uuid()))
            .filter(run::Column::TaskId.eq(Uuid::from(task_id)))
            .order_by_desc(run::Column::Id)
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(Run::try_from)
            .transpose()
    }

    /// A run's log lines from `from_offset`, in order, at most `limit`.
    pub async fn run_logs(&self, id: RunId, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        self.run_log(id).await?.lines(from_offset, limit).await
    }

    /// The log lines of a run read through this handle already (no second look-up: a
    /// claimed fire that turned out not due may be gone by now, its lines with it).
    pub async fn logs_of(&self, run: &Run, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        self.require(Action::Read)?;
        if run.tenant_id != self.tenant_id() {
            return Err(Error::NotFound("run"));
        }
        RunLog {
            db: self.db.clone(),
            run: run.id,
        }
        .lines(from_offset, limit)
        .await
    }

    /// A run's log, for a follower: access is checked here, once.
    pub async fn run_log(&self, id: RunId) -> Result<RunLog> {
        self.run(id).await?;
        Ok(RunLog {
            db: self.db.clone(),
            run: id,
        })
    }
}

/// One run's log lines and whether the run has ended, reached through
/// [`TenantHandle::run_log`].
#[derive(Debug, Clone)]
pub struct RunLog {
    db: sea_orm::DatabaseConnection,
    run: RunId,
}

impl RunLog {
    /// Lines from `from_offset`, in order, at most `limit`.
    pub async fn lines(&self, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        let rows = run_log_line::Entity::find()
            .filter(run_log_line::Column::RunId.eq(Uuid::from(self.run)))
            .filter(run_log_line::Column::Offset.gte(from_offset as i64))
            .order_by_asc(run_log_line::Column::Offset)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(LogLine::try_from).collect()
    }

    /// Whether the run has its outcome (its last line is stored before it).
    pub async fn has_ended(&self) -> Result<bool> {
        let status: Option<String> = run::Entity::find_by_id(Uuid::from(self.run))
            .select_only()
            .column(run::Column::Status)
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(status
            .as_deref()
            .and_then(RunStatus::parse)
            .is_none_or(RunStatus::is_final))
    }
}
