//! Queued runs that nobody took in time (`queue_expiry_secs`): they end FAILED with reason
//! QUEUE_EXPIRED, and are mailed like any failure. A queued run never waits forever.

use std::time::Duration;

use cloudtask_core::Result;
use cloudtask_core::run::RunStatus;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use super::machine::{self, RunEvent, Step};
use super::run_event;
use crate::entities::run;
use crate::live_events::Outgoing;
use crate::{Catalogue, notifications, now};

impl Catalogue {
    /// Ends every run queued longer than `max_age` (any cluster): FAILED, QUEUE_EXPIRED.
    /// Returns how many.
    pub async fn expire_queued_runs(&self, max_age: Duration) -> Result<u64> {
        let Step::To(status, reason) = machine::step(Some(RunStatus::Queued), &RunEvent::Expire)
        else {
            unreachable!("a queued run expires");
        };
        let reason = reason.map(|r| r.as_str().to_owned());
        let now = now();
        let before = now - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        let error = format!(
            "no worker took the run within {} s (queue_expiry_secs)",
            max_age.as_secs()
        );
        let (expired, events) = self
            .in_transaction(async |txn| {
                let rows = run::Entity::update_many()
                    .col_expr(run::Column::Status, Expr::value(status.as_str()))
                    .col_expr(run::Column::Reason, Expr::value(reason.clone()))
                    .col_expr(run::Column::FinishedAt, Expr::value(now))
                    .col_expr(run::Column::Error, Expr::value(error.clone()))
                    .filter(run::Column::Status.eq(RunStatus::Queued.as_str()))
                    .filter(run::Column::CreatedAt.lt(before))
                    .exec_with_returning(txn)
                    .await?;
                let mut events = Outgoing::default();
                for row in &rows {
                    events.add(run_event(row));
                    notifications::run_ended(txn, row).await?;
                }
                Ok((rows.len() as u64, events))
            })
            .await?;
        events.publish(&self.db, &self.hub);
        Ok(expired)
    }
}
