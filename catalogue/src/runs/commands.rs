//! What the scheduler leader delivers to a cluster's workers as commands: manual runs
//! waiting to start (handed to the task's worker), and running runs a user asked to stop.

use cloudtask_core::Result;
use cloudtask_core::ids::{ClusterId, RunId, WorkerId};
use cloudtask_core::run::RunStatus;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use super::Run;
use crate::Catalogue;
use crate::entities::run;

impl Catalogue {
    /// A cluster's queued runs, and its running runs with a stop requested.
    pub async fn pending_commands(&self, cluster_id: ClusterId) -> Result<(Vec<Run>, Vec<Run>)> {
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
    pub async fn hand_queued_run(&self, run_id: RunId, worker: &WorkerId) -> Result<()> {
        self.with_db(async |db| {
            run::Entity::update_many()
                .col_expr(run::Column::WorkerId, Expr::value(worker.as_str()))
                .filter(run::Column::Id.eq(Uuid::from(run_id)))
                .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                .exec(db)
                .await?;
            Ok(())
        })
        .await
    }
}
