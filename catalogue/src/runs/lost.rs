//! The scheduler's verdict on a worker whose session ended without a clean leave: its
//! unfinished runs are LOST, each lost fire's next attempt is queued as the task's retry
//! policy allows, and queued runs handed to it go back to the queue.

use chrono::{DateTime, Utc};
use cloudtask_core::Result;
use cloudtask_core::ids::{ClusterId, WorkerId};
use cloudtask_core::run::{RunStatus, RunTrigger};
use cloudtask_core::task::TaskState;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use super::machine::{self, RunEvent, Step};
use super::{new_run, run_event};
use crate::entities::{run, task};
use crate::error::DbResult;
use crate::live_events::{Event, Outgoing};
use crate::mirror_changes::notify;
use crate::{Catalogue, decode_spec, notifications, now};

const LOST_REASON: &str = "the worker's session ended while the run was going";

impl Catalogue {
    /// Marks the worker's unfinished runs LOST. Returns how many.
    pub async fn mark_worker_runs_lost(
        &self,
        cluster_id: ClusterId,
        worker: &WorkerId,
    ) -> Result<u64> {
        let (lost, events) = self
            .in_transaction(async |txn| {
                let of_worker = || {
                    run::Entity::find()
                        .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
                        .filter(run::Column::WorkerId.eq(worker.as_str()))
                };
                let lost = of_worker()
                    .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
                    .all(txn)
                    .await?;
                let now = now();
                let Step::To(status, reason) =
                    machine::step(Some(RunStatus::Running), &RunEvent::WorkerLost)
                else {
                    unreachable!("a running run is lost with its worker");
                };
                let reason = reason.map(|r| r.as_str().to_owned());
                run::Entity::update_many()
                    .col_expr(run::Column::Status, Expr::value(status.as_str()))
                    .col_expr(run::Column::Reason, Expr::value(reason.clone()))
                    .col_expr(run::Column::FinishedAt, Expr::value(now))
                    .col_expr(run::Column::Error, Expr::value(LOST_REASON))
                    .filter(run::Column::Id.is_in(lost.iter().map(|r| r.id)))
                    .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
                    .exec(txn)
                    .await?;
                let mut events = Outgoing::default();
                for run in &lost {
                    let ended = run::Model {
                        status: status.as_str().into(),
                        reason: reason.clone(),
                        finished_at: Some(now),
                        error: Some(LOST_REASON.into()),
                        ..run.clone()
                    };
                    events.add(run_event(&ended));
                    notifications::run_ended(txn, &ended).await?;
                }
                queue_retries(txn, &lost, now, &mut events).await?;
                // Manual runs handed to it but not started go back to the queue, for the
                // task's next owner.
                run::Entity::update_many()
                    .col_expr(run::Column::WorkerId, Expr::value(Option::<String>::None))
                    .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
                    .filter(run::Column::WorkerId.eq(worker.as_str()))
                    .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                    .exec(txn)
                    .await?;
                Ok((lost.len() as u64, events))
            })
            .await?;
        events.publish(&self.db, &self.hub);
        Ok(lost)
    }
}

/// The retry policy decides what a lost fire becomes (lost with its worker, or ended by
/// the platform: fenced, shut down, moved): its next attempt is queued for the task's
/// next owner (the unique key keeps it single). Manual runs and paused tasks get none.
pub(super) async fn queue_retries(
    conn: &impl ConnectionTrait,
    lost: &[run::Model],
    now: DateTime<Utc>,
    events: &mut Outgoing,
) -> DbResult<()> {
    for run in lost {
        if run.fire_at.is_none() {
            continue; // manual runs are not retried
        }
        let Some(task) = task::Entity::find_by_id(run.task_id).one(conn).await? else {
            continue;
        };
        let spec = decode_spec(task.spec.clone())?;
        if task.state == TaskState::Paused.as_str() || run.attempt as u32 >= spec.max_retries {
            continue;
        }
        let retry = new_run(
            &task,
            RunTrigger::Retry,
            &RunEvent::Queue,
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
            .exec_without_returning(conn)
            .await?;
        if matches!(inserted, sea_orm::TryInsertResult::Inserted(n) if n > 0) {
            events.add(retry_event);
            // The scheduler hands it out (a worker's report is not its to hear otherwise).
            notify(conn, task.cluster_id.into()).await?;
        }
    }
    Ok(())
}
