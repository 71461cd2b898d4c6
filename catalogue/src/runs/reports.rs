//! What a worker reports about its cluster's runs: log lines, starts, outcomes, and
//! fires claimed but given up. One batch is one transaction, idempotent like one report
//! at a time: a line is keyed by (run, offset), an outcome lands on a run that has none.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use cloudtask_core::ids::RunId;
use cloudtask_core::protocol::Report;
use cloudtask_core::run::{LogLine, Outcome, RunReason, RunStatus, RunTrigger};
use cloudtask_core::task::TaskState;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::{ArrayType, CaseStatement, Expr, LockType, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
};
use uuid::Uuid;

use super::lost::queue_retries;
use super::machine::{self, RunEvent, Step};
use super::{run_event, tasks_by_id};
use crate::entities::{run, run_log_line, task};
use crate::error::DbResult;
use crate::live_events::{Event, Outgoing};
use crate::logs::{MAX_LOG_BATCH, log_row, stored_text};
use crate::{ClusterHandle, notifications, now};

/// Runs updated by one statement in a batch: each column's value is a CASE over the run
/// ids, so the statement stays small enough to plan quickly.
const UPDATE_CHUNK: usize = 200;

impl ClusterHandle {
    /// Stores a batch of reports (log lines and outcomes of any runs of the cluster) in
    /// one transaction, with the same idempotence as one by one. Reports for runs that
    /// are not this cluster's are ignored (and logged): they can never be delivered.
    pub async fn ingest_reports(&self, reports: &[Report]) -> Result<()> {
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
        let events = self
            .scoped(async |txn| {
                let known = self.known_runs(txn, reports).await?;
                let reports: Vec<&Report> = reports
                    .iter()
                    .filter(|report| {
                        let known = known.contains(&report.run().into());
                        if !known {
                            let (run, cluster) = (report.run(), self.cluster_id());
                            tracing::warn!(%run, %cluster, "ignoring a report for an unknown run");
                        }
                        known
                    })
                    .collect();
                let mut events = store_lines(txn, &reports).await?;
                self.apply_outcomes(txn, &reports, &mut events).await?;
                events.notify_within(txn).await?;
                Ok(events)
            })
            .await?;
        events.publish(&self.db, &self.hub);
        Ok(())
    }

    /// The runs of the batch that are this cluster's, held (`FOR KEY SHARE`, on Postgres)
    /// until the batch commits: a run is not deleted under lines being stored for it (its
    /// lines have no foreign key, see the `log_lines_without_fk` migration).
    async fn known_runs(
        &self,
        conn: &impl ConnectionTrait,
        reports: &[Report],
    ) -> DbResult<HashSet<Uuid>> {
        let mut runs: Vec<Uuid> = reports.iter().map(|r| r.run().into()).collect();
        runs.sort();
        runs.dedup();
        Ok(self
            .find::<run::Entity>()
            .select_only()
            .column(run::Column::Id)
            .filter(run::Column::Id.is_in(runs))
            .lock(LockType::KeyShare)
            .into_tuple::<Uuid>()
            .all(conn)
            .await?
            .into_iter()
            .collect())
    }

    /// Starts, outcomes and abandoned claims of the batch, each kind in few statements.
    async fn apply_outcomes(
        &self,
        conn: &impl ConnectionTrait,
        reports: &[&Report],
        events: &mut Outgoing,
    ) -> DbResult<()> {
        let mut abandoned = Vec::new();
        let mut started = Vec::new();
        let mut finished = Vec::new();
        for report in reports {
            match report {
                Report::Abandon { run, reason } => abandoned.push((*run, reason.as_str())),
                Report::Started { run, at } => started.push((*run, *at)),
                Report::Finish { run, outcome } => {
                    if !outcome.status.is_final() || outcome.status == RunStatus::Skipped {
                        Err(Error::bad_input("status", "not an outcome"))?;
                    }
                    finished.push((*run, machine::complete(outcome)));
                }
                Report::Logs { .. } => {}
            }
        }
        for chunk in abandoned.chunks(UPDATE_CHUNK) {
            for row in self.abandon(conn, chunk).await? {
                events.add(run_event(&row));
            }
        }
        for chunk in started.chunks(UPDATE_CHUNK) {
            // A claimed fire is listed and announced from its start (see `runs`).
            for row in self.mark_started(conn, chunk).await? {
                events.add(run_event(&row));
            }
        }
        self.paused_tasks_stop(conn, &mut finished).await?;
        let now = now();
        for chunk in finished.chunks(UPDATE_CHUNK) {
            let ended = self.finish_many(conn, chunk).await?;
            for row in &ended {
                events.add(run_event(row));
                notifications::run_ended(conn, row).await?;
            }
            // Runs the platform ended (fenced, shut down, moved): the retry policy
            // applies, as to a run lost with its worker.
            let lost: Vec<run::Model> = ended
                .into_iter()
                .filter(|r| r.status == RunStatus::Lost.as_str())
                .collect();
            queue_retries(conn, &lost, now, events).await?;
        }
        Ok(())
    }

    /// Runs their worker stopped because the task left it: those of a paused task were
    /// stopped by the pause (STOPPED, TASK_PAUSED), not by the platform.
    async fn paused_tasks_stop(
        &self,
        conn: &impl ConnectionTrait,
        finished: &mut [(RunId, Outcome)],
    ) -> DbResult<()> {
        let moved: Vec<Uuid> = finished
            .iter()
            .filter(|(_, o)| o.reason == Some(RunReason::TaskMoved))
            .map(|(run, _)| Uuid::from(*run))
            .collect();
        if moved.is_empty() {
            return Ok(());
        }
        let task_of: HashMap<Uuid, Uuid> = self
            .find::<run::Entity>()
            .select_only()
            .column(run::Column::Id)
            .column(run::Column::TaskId)
            .filter(run::Column::Id.is_in(moved))
            .into_tuple::<(Uuid, Uuid)>()
            .all(conn)
            .await?
            .into_iter()
            .collect();
        let tasks = self.find::<task::Entity>();
        let tasks = tasks_by_id(conn, tasks, task_of.values().copied()).await?;
        for (run, outcome) in finished.iter_mut() {
            let paused = task_of
                .get(&Uuid::from(*run))
                .and_then(|t| tasks.get(t))
                .is_some_and(|t| t.state == TaskState::Paused.as_str());
            if paused {
                *outcome = machine::left_paused(outcome);
            }
        }
        Ok(())
    }

    /// Fires claimed ahead of their time and not started: a record goes when its fire was
    /// not due after all (the task paused or deleted before it, or edited since the
    /// claim), else it is a fire not run, SKIPPED with the worker's reason. Returns the
    /// rows that ended SKIPPED.
    async fn abandon(
        &self,
        conn: &impl ConnectionTrait,
        abandoned: &[(RunId, &str)],
    ) -> DbResult<Vec<run::Model>> {
        let rows = self
            .find::<run::Entity>()
            .filter(run::Column::Id.is_in(abandoned.iter().map(|(r, _)| Uuid::from(*r))))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .filter(run::Column::StartedAt.is_null())
            .filter(run::Column::Trigger.eq(RunTrigger::Schedule.as_str()))
            .all(conn)
            .await?; // the others started, or ended already
        let tasks = self.find::<task::Entity>();
        let tasks = tasks_by_id(conn, tasks, rows.iter().map(|r| r.task_id)).await?;
        let (not_due, due): (Vec<run::Model>, Vec<run::Model>) =
            rows.into_iter().partition(|row| {
                tasks.get(&row.task_id).is_none_or(|t| {
                    (t.state == TaskState::Paused.as_str() && row.scheduled_at > t.updated_at)
                        || t.version != row.task_version
                })
            });
        if !not_due.is_empty() {
            run::Entity::delete_many()
                .filter(self.within::<run::Entity>())
                .filter(run::Column::Id.is_in(not_due.iter().map(|r| r.id)))
                .exec(conn)
                .await?;
        }
        let now = now();
        let reasons: HashMap<Uuid, &str> = abandoned
            .iter()
            .map(|(run, reason)| (Uuid::from(*run), *reason))
            .collect();
        let outcomes: Vec<(RunId, Outcome)> = due
            .iter()
            .map(|row| {
                let error = reasons.get(&row.id).map(|r| (*r).to_owned());
                let event = RunEvent::Abandon(machine::skip_reason_of(error.as_deref()));
                let Step::To(status, reason) = machine::step(Some(RunStatus::Running), &event)
                else {
                    unreachable!("a claimed fire is given up");
                };
                let outcome = Outcome {
                    status,
                    exit_code: None,
                    signal: None,
                    error,
                    finished_at: now,
                    reason,
                };
                (row.id.into(), outcome)
            })
            .collect();
        self.finish_many(conn, &outcomes).await
    }

    /// Started reports: the start time lands on runs still going; the runs it landed on.
    async fn mark_started(
        &self,
        conn: &impl ConnectionTrait,
        started: &[(RunId, DateTime<Utc>)],
    ) -> DbResult<Vec<run::Model>> {
        Ok(run::Entity::update_many()
            .col_expr(
                run::Column::StartedAt,
                per_run(started, run::Column::StartedAt, |at| Some(*at)),
            )
            .filter(self.within::<run::Entity>())
            .filter(run::Column::Id.is_in(ids(started)))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .exec_with_returning(conn)
            .await?)
    }

    /// An outcome lands only on a run that has none yet; the ended run, if this one did.
    pub(super) async fn finish(
        &self,
        conn: &impl ConnectionTrait,
        run_id: RunId,
        outcome: &Outcome,
    ) -> DbResult<Option<run::Model>> {
        Ok(self.finish_many(conn, &[(run_id, outcome)]).await?.pop())
    }

    /// Outcomes of many runs in one statement: each lands only on a run still RUNNING
    /// (the state machine's [`RunEvent::Finish`]; a queued run has no outcome to take).
    /// Returns the runs that ended here. A run given twice takes its first outcome.
    async fn finish_many(
        &self,
        conn: &impl ConnectionTrait,
        outcomes: &[(RunId, impl Borrow<Outcome>)],
    ) -> DbResult<Vec<run::Model>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        // What the machine makes of each outcome (made whole by `machine::complete`).
        let outcomes: Vec<(RunId, Outcome)> = outcomes
            .iter()
            .map(|(run, outcome)| {
                let outcome: &Outcome = outcome.borrow();
                let event =
                    RunEvent::Finish(outcome.status, outcome.reason.unwrap_or(RunReason::Exit));
                let Step::To(status, reason) = machine::step(Some(RunStatus::Running), &event)
                else {
                    unreachable!("a running run takes an outcome");
                };
                (
                    *run,
                    Outcome {
                        status,
                        reason,
                        ..outcome.clone()
                    },
                )
            })
            .collect();
        let outcomes = &outcomes[..];
        let column = |column: run::Column, value: fn(&Outcome) -> sea_orm::Value| {
            (column, per_run(outcomes, column, value))
        };
        let mut update = run::Entity::update_many();
        for (name, value) in [
            column(run::Column::Status, |o| o.status.as_str().into()),
            column(run::Column::ExitCode, |o| o.exit_code.into()),
            column(run::Column::Signal, |o| o.signal.into()),
            column(run::Column::Error, |o| o.error.clone().into()),
            column(run::Column::FinishedAt, |o| Some(o.finished_at).into()),
            column(run::Column::Reason, |o| {
                o.reason.map(|r| r.as_str().to_owned()).into()
            }),
        ] {
            update = update.col_expr(name, value);
        }
        Ok(update
            .filter(self.within::<run::Entity>())
            .filter(run::Column::Id.is_in(ids(outcomes)))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .exec_with_returning(conn)
            .await?)
    }
}

/// The log lines of the batch, in one statement (Postgres) or one insert per thousand
/// (SQLite); the events that say how far each run's lines are stored.
async fn store_lines(conn: &impl ConnectionTrait, reports: &[&Report]) -> DbResult<Outgoing> {
    let mut rows = Vec::new();
    // Per run, the offset after its last line in this batch (for subscribers).
    let mut stored: Vec<(RunId, u64)> = Vec::new();
    for report in reports {
        if let Report::Logs { run, lines } = report {
            rows.extend(lines.iter().map(|line| (*run, line)));
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
    if rows.is_empty() {
        return Ok(events);
    }
    if conn.get_database_backend() == DbBackend::Postgres {
        conn.execute_raw(insert_lines_statement(&rows)).await?;
        return Ok(events);
    }
    let rows: Vec<_> = rows.iter().map(|(run, line)| log_row(*run, line)).collect();
    for chunk in rows.chunks(1_000) {
        run_log_line::Entity::insert_many(chunk.to_vec())
            .on_conflict_do_nothing_on([run_log_line::Column::RunId, run_log_line::Column::Offset])
            .exec_without_returning(conn)
            .await?;
    }
    Ok(events)
}

/// Every line of a batch in one statement of five arrays (Postgres): the same text for
/// every batch, so it is planned once per connection, where a multi-row insert has a new
/// statement (and plan) for every row count and binds five values a line.
fn insert_lines_statement(rows: &[(RunId, &LogLine)]) -> Statement {
    fn array(kind: ArrayType, values: impl Iterator<Item = sea_orm::Value>) -> sea_orm::Value {
        sea_orm::Value::Array(kind, Some(Box::new(values.collect())))
    }
    Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"INSERT INTO run_log_lines (run_id, "offset", stream, at, line)
           SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::timestamptz[], $5::text[])
           ON CONFLICT (run_id, "offset") DO NOTHING"#,
        [
            array(
                ArrayType::Uuid,
                rows.iter().map(|(run, _)| Uuid::from(*run).into()),
            ),
            array(
                ArrayType::BigInt,
                rows.iter().map(|(_, l)| (l.offset as i64).into()),
            ),
            array(
                ArrayType::String,
                rows.iter().map(|(_, l)| l.stream.as_str().into()),
            ),
            array(
                ArrayType::ChronoDateTimeUtc,
                rows.iter().map(|(_, l)| l.at.into()),
            ),
            array(
                ArrayType::String,
                rows.iter().map(|(_, l)| stored_text(&l.text).into()),
            ),
        ],
    )
}

/// `column = CASE id WHEN .. THEN .. END` over the runs of one batch.
fn per_run<X, T: Into<sea_orm::Value>>(
    runs: &[(RunId, X)],
    column: run::Column,
    value: impl Fn(&X) -> T,
) -> SimpleExpr {
    let mut case = CaseStatement::new();
    for (run, x) in runs {
        case = case.case(run::Column::Id.eq(Uuid::from(*run)), Expr::value(value(x)));
    }
    case.finally(Expr::col(column)).into()
}

fn ids<X>(runs: &[(RunId, X)]) -> impl Iterator<Item = Uuid> + '_ {
    runs.iter().map(|(run, _)| Uuid::from(*run))
}
