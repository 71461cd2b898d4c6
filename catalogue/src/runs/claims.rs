//! What a worker does before and as it starts a process: claims of fires (the unique
//! key decides which claim wins), the start of a queued run, and the fire cursor a new
//! owner of a task accounts for missed fires from.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{RunId, TaskId, WorkerId};
use cloudtask_core::protocol::Claim;
use cloudtask_core::run::{Outcome, RunStatus, RunTrigger};
use cloudtask_core::task::TaskState;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder,
};
use uuid::Uuid;

use super::machine::{self, RunEvent, Step};
use super::{Run, new_run, run_event, tasks_by_id};
use crate::ClusterHandle;
use crate::entities::{run, task};
use crate::error::DbResult;
use crate::live_events::Outgoing;
use crate::now;

/// A claim's answer, before the batch is over.
type Answer = Option<Result<Run>>;

impl ClusterHandle {
    /// Records a claim of one fire by a worker of this cluster: a RUNNING run (the worker
    /// may start the process) or a SKIPPED one. Refused with CONFLICT when the fire is
    /// claimed already, the task is paused, or the worker's spec is not the current version;
    /// NOT_FOUND when the task is not in this cluster.
    pub async fn claim_run(&self, claim: &Claim) -> Result<Run> {
        self.claim_runs(std::slice::from_ref(claim))
            .await?
            .pop()
            .expect("one answer per claim")
    }

    /// Claims of many fires (a worker claims a second's fires at once) in one
    /// transaction and one insert; each is answered as [`ClusterHandle::claim_run`] would
    /// answer it alone. The outer error is the database's: nothing was recorded.
    pub async fn claim_runs(&self, claims: &[Claim]) -> Result<Vec<Result<Run>>> {
        let mut answers: Vec<Answer> = claims
            .iter()
            .map(|claim| check_claim(claim).err().map(Err))
            .collect();
        let events = self
            .scoped(async |txn| {
                let tasks = self.find::<task::Entity>();
                let tasks =
                    tasks_by_id(txn, tasks, claims.iter().map(|c| c.task_id.into())).await?;
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
                let inserted = insert_claims(txn, models).await?;
                self.answer_claims(txn, claims, &mut answers, inserted, now)
                    .await
            })
            .await?;
        events.publish(&self.db, &self.hub);
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every claim answered"))
            .collect())
    }

    /// A worker starts a queued manual run: QUEUED → RUNNING, once.
    pub async fn start_queued_run(&self, run_id: RunId, worker: &WorkerId) -> Result<Run> {
        let run = self
            .scoped(async |txn| {
                let Step::To(status, reason) =
                    machine::step(Some(RunStatus::Queued), &RunEvent::Start)
                else {
                    unreachable!("a queued run starts");
                };
                let result = run::Entity::update_many()
                    .col_expr(run::Column::Status, Expr::value(status.as_str()))
                    .col_expr(run::Column::Reason, Expr::value(reason.map(|r| r.as_str())))
                    .col_expr(run::Column::StartedAt, Expr::value(now()))
                    .col_expr(run::Column::WorkerId, Expr::value(worker.as_str()))
                    .filter(self.within::<run::Entity>())
                    .filter(run::Column::Id.eq(Uuid::from(run_id)))
                    .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                    .exec(txn)
                    .await?;
                let run = self.run_model(txn, run_id).await?;
                if result.rows_affected == 0 {
                    Err(Error::Conflict("the run is not queued any more".into()))?;
                }
                Ok(run)
            })
            .await?;
        let mut events = Outgoing::default();
        events.add(run_event(&run));
        events.publish(&self.db, &self.hub);
        run.try_into()
    }

    /// Where a new owner of the task starts accounting for fires: the latest scheduled
    /// fire claimed so far, or the task's last change (creation, edit, resume) if later.
    /// Fires after it and before now were due while nobody could run them: misfires.
    pub async fn fire_cursor(&self, task_id: TaskId) -> Result<DateTime<Utc>> {
        self.reading(async |txn| {
            let task = self
                .find::<task::Entity>()
                .filter(task::Column::Id.eq(Uuid::from(task_id)))
                .one(txn)
                .await?
                .ok_or(Error::NotFound("task"))?;
            let last_fire = self
                .find::<run::Entity>()
                .filter(run::Column::TaskId.eq(task.id))
                .filter(run::Column::FireAt.is_not_null())
                .order_by_desc(run::Column::FireAt)
                .one(txn)
                .await?
                .and_then(|r| r.fire_at);
            Ok(last_fire.map_or(task.updated_at, |fire| fire.max(task.updated_at)))
        })
        .await
    }

    async fn run_model(&self, conn: &impl ConnectionTrait, run_id: RunId) -> DbResult<run::Model> {
        Ok(self
            .find::<run::Entity>()
            .filter(run::Column::Id.eq(Uuid::from(run_id)))
            .one(conn)
            .await?
            .ok_or(Error::NotFound("run"))?)
    }
}

/// Inserts the claimable fires in one statement; a fire claimed already gets no row.
async fn insert_claims(
    txn: &DatabaseTransaction,
    mut models: Vec<run::ActiveModel>,
) -> DbResult<HashMap<(Uuid, i64, i32), run::Model>> {
    if models.is_empty() {
        return Ok(HashMap::new());
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
    let result = run::Entity::insert_many(models)
        .on_conflict_do_nothing_on([
            run::Column::TaskId,
            run::Column::FireAt,
            run::Column::Attempt,
        ])
        .exec_with_returning_many(txn)
        .await;
    // ON CONFLICT DO NOTHING returns no row for a fire claimed already.
    let rows = match result {
        Ok(sea_orm::TryInsertResult::Inserted(rows)) => rows,
        Ok(_) | Err(sea_orm::DbErr::RecordNotFound(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let key = (row.task_id, row.fire_at?.timestamp_micros(), row.attempt);
            Some((key, row))
        })
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
fn claim_row(task: &task::Model, claim: &Claim, now: DateTime<Utc>) -> run::ActiveModel {
    let running = claim.status == RunStatus::Running;
    let event = if running {
        RunEvent::Claim
    } else {
        RunEvent::Record(machine::skip_reason_of(claim.reason.as_deref()))
    };
    run::ActiveModel {
        finished_at: Set((!running).then_some(now)),
        error: Set(claim.reason.clone()),
        ..new_run(
            task,
            claim.trigger,
            &event,
            claim.scheduled_at,
            Some(claim.attempt as i32),
            Some(&claim.worker),
            now,
        )
    }
}

impl ClusterHandle {
    /// Answers the claims still open from the rows inserted; the events to announce.
    async fn answer_claims(
        &self,
        txn: &DatabaseTransaction,
        claims: &[Claim],
        answers: &mut [Answer],
        mut inserted: HashMap<(Uuid, i64, i32), run::Model>,
        now: DateTime<Utc>,
    ) -> DbResult<Outgoing> {
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
                    // A fire claimed to run is announced from its start (it is not listed
                    // before); a fire recorded as not run is news now.
                    if row.status != RunStatus::Running.as_str() {
                        events.add(run_event(&row));
                    }
                    row.try_into()
                }
                None => match self.claimed_already(txn, claim, now).await? {
                    Some(row) => {
                        if row.status != RunStatus::Running.as_str() {
                            events.add(run_event(&row));
                        }
                        row.try_into()
                    }
                    None => Err(Error::Conflict("this fire is claimed already".into())),
                },
            });
        }
        Ok(events)
    }

    /// A claim of a fire that has its record already. The same worker asking again (its
    /// first answer was lost on the way) gets the same run, as long as nothing has happened
    /// to it yet; one that gave up on its claim (the answer never came) and records the
    /// fire as missed turns the claim it did make into that record. None: refused.
    async fn claimed_already(
        &self,
        conn: &impl ConnectionTrait,
        claim: &Claim,
        now: DateTime<Utc>,
    ) -> DbResult<Option<run::Model>> {
        let existing = self
            .find::<run::Entity>()
            .filter(run::Column::TaskId.eq(Uuid::from(claim.task_id)))
            .filter(run::Column::FireAt.eq(claim.scheduled_at))
            .filter(run::Column::Attempt.eq(claim.attempt as i32))
            .one(conn)
            .await?;
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
        let Step::To(status, reason) = machine::step(
            Some(RunStatus::Running),
            &RunEvent::Abandon(machine::skip_reason_of(claim.reason.as_deref())),
        ) else {
            unreachable!("a claimed fire is given up");
        };
        let outcome = Outcome {
            status,
            exit_code: None,
            signal: None,
            error: claim.reason.clone(),
            finished_at: now,
            reason,
        };
        self.finish(conn, existing.id.into(), &outcome).await
    }
}
