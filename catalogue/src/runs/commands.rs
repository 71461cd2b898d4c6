//! What the scheduler leader delivers to a cluster's workers as commands: manual runs
//! waiting to start (handed to the task's worker), and running runs a user asked to stop;
//! and what it says of a queued run nobody can take (WAITING_FOR_WORKER).

use std::collections::HashSet;

use cloudtask_core::Result;
use cloudtask_core::ids::{ClusterId, RunId, TaskId, WorkerId};
use cloudtask_core::run::{RunStatus, RunTrigger};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use super::machine::{self, RunEvent, Step};
use super::{Run, run_event};
use crate::Catalogue;
use crate::entities::run;
use crate::live_events::Outgoing;

/// A cluster's runs that need the scheduler.
#[derive(Debug, Default)]
pub struct PendingCommands {
    /// Queued runs, oldest first: each for its task's worker.
    pub queued: Vec<Run>,
    /// Running runs a user asked to stop.
    pub stops: Vec<Run>,
    /// Tasks with a manual run queued or going: held by a worker even while paused
    /// (pausing stops the schedule, not the operator's runs).
    pub manual_tasks: HashSet<TaskId>,
}

impl Catalogue {
    /// A cluster's queued runs, its running runs with a stop requested, and the tasks
    /// with a manual run not ended.
    pub async fn pending_commands(&self, cluster_id: ClusterId) -> Result<PendingCommands> {
        let rows = self
            .with_db(async |db| {
                Ok(run::Entity::find()
                    .filter(run::Column::ClusterId.eq(Uuid::from(cluster_id)))
                    .filter(
                        run::Column::Status
                            .is_in([RunStatus::Queued.as_str(), RunStatus::Running.as_str()]),
                    )
                    .order_by_asc(run::Column::Id)
                    .all(db)
                    .await?)
            })
            .await?;
        let mut pending = PendingCommands::default();
        for row in rows {
            let stop = row.stop_requested_at.is_some();
            let run = Run::try_from(row)?;
            if run.trigger == RunTrigger::Manual {
                pending.manual_tasks.insert(run.task_id);
            }
            match run.status {
                RunStatus::Queued => pending.queued.push(run),
                _ if stop => pending.stops.push(run),
                _ => {}
            }
        }
        Ok(pending)
    }

    /// Notes which worker a queued run was handed to (it waits for nobody any more).
    pub async fn hand_queued_run(&self, run_id: RunId, worker: &WorkerId) -> Result<()> {
        let Step::To(status, reason) =
            machine::step(Some(RunStatus::Queued), &RunEvent::Waiting(false))
        else {
            unreachable!("a queued run is handed");
        };
        self.with_db(async |db| {
            run::Entity::update_many()
                .col_expr(run::Column::WorkerId, Expr::value(worker.as_str()))
                .col_expr(run::Column::Status, Expr::value(status.as_str()))
                .col_expr(run::Column::Reason, Expr::value(reason.map(|r| r.as_str())))
                .filter(run::Column::Id.eq(Uuid::from(run_id)))
                .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                .exec(db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Queued runs no live worker can take (their task has no owner): they say so
    /// (reason WAITING_FOR_WORKER), once; announced to subscribers.
    pub async fn mark_waiting_for_worker(&self, runs: &[Run]) -> Result<()> {
        let Step::To(status, reason) =
            machine::step(Some(RunStatus::Queued), &RunEvent::Waiting(true))
        else {
            unreachable!("a queued run waits");
        };
        let waiting: Vec<Uuid> = runs
            .iter()
            .filter(|r| r.status == RunStatus::Queued && r.reason != reason)
            .map(|r| r.id.into())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let rows = self
            .with_db(async |db| {
                Ok(run::Entity::update_many()
                    .col_expr(run::Column::Status, Expr::value(status.as_str()))
                    .col_expr(run::Column::Reason, Expr::value(reason.map(|r| r.as_str())))
                    .filter(run::Column::Id.is_in(waiting))
                    .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                    .exec_with_returning(db)
                    .await?)
            })
            .await?;
        let mut events = Outgoing::default();
        for row in &rows {
            events.add(run_event(row));
        }
        events.publish(&self.db, &self.hub);
        Ok(())
    }
}
