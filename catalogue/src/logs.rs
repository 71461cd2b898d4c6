//! Run log lines: stored by (run, offset) as workers report them (`runs::reports`),
//! read by the run's tenant, followed live by subscribers through a [`RunLog`].

use cloudtask_core::ids::RunId;
use cloudtask_core::roles::Action;
use cloudtask_core::run::{LogLine, LogStream, RunStatus};
use cloudtask_core::{Error, Result};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use crate::entities::{run, run_log_line};
use crate::{Catalogue, Run, TenantHandle};

/// Most log lines one request may carry.
pub const MAX_LOG_BATCH: usize = cloudtask_core::protocol::MAX_REPORT_LINES;

impl TryFrom<run_log_line::Model> for LogLine {
    type Error = Error;

    fn try_from(m: run_log_line::Model) -> Result<Self> {
        Ok(LogLine {
            offset: m.offset as u64,
            stream: LogStream::parse(&m.stream)
                .ok_or_else(|| Error::internal(format!("stored log stream {:?}", m.stream)))?,
            at: m.at,
            text: m.line,
        })
    }
}

pub(crate) fn log_row(run_id: RunId, line: &LogLine) -> run_log_line::ActiveModel {
    run_log_line::ActiveModel {
        run_id: Set(run_id.into()),
        offset: Set(line.offset as i64),
        stream: Set(line.stream.as_str().into()),
        at: Set(line.at),
        line: Set(stored_text(&line.text)),
    }
}

/// A line's text as stored: Postgres text cannot hold NUL, written as workers escape it
/// (`\x00`).
pub(crate) fn stored_text(text: &str) -> String {
    text.replace('\0', "\\x00")
}

impl Catalogue {
    /// The last `count` log lines of a run, in order (for a failure mail).
    pub async fn last_log_lines(&self, run_id: RunId, count: u64) -> Result<Vec<LogLine>> {
        let mut rows = self
            .with_db(async |db| {
                Ok(run_log_line::Entity::find()
                    .filter(run_log_line::Column::RunId.eq(Uuid::from(run_id)))
                    .order_by_desc(run_log_line::Column::Offset)
                    .limit(count)
                    .all(db)
                    .await?)
            })
            .await?;
        rows.reverse();
        rows.into_iter().map(LogLine::try_from).collect()
    }
}

impl TenantHandle {
    /// A run's log lines from `from_offset`, in order, at most `limit`.
    pub async fn run_logs(&self, id: RunId, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        self.run_log(id).await?.lines(from_offset, limit).await
    }

    /// The log lines of a run read through this handle already (no second look-up: a
    /// claimed fire that turned out not due may be gone by now, its lines with it).
    pub async fn logs_of(&self, run: &Run, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        self.require(Action::Read).await?;
        if run.tenant_id != self.tenant_id() {
            return Err(Error::NotFound("run"));
        }
        RunLog {
            tenant: self.clone(),
            run: run.id,
        }
        .lines(from_offset, limit)
        .await
    }

    /// A run's log, for a follower: access is checked here, once.
    pub async fn run_log(&self, id: RunId) -> Result<RunLog> {
        self.run(id).await?;
        Ok(RunLog {
            tenant: self.clone(),
            run: id,
        })
    }
}

/// One run's log lines and whether the run has ended, reached through
/// [`TenantHandle::run_log`].
#[derive(Debug, Clone)]
pub struct RunLog {
    tenant: TenantHandle,
    run: RunId,
}

impl RunLog {
    /// Lines from `from_offset`, in order, at most `limit`.
    pub async fn lines(&self, from_offset: u64, limit: u64) -> Result<Vec<LogLine>> {
        let rows = self
            .tenant
            .reading(Action::Read, async |txn| {
                Ok(self
                    .tenant
                    .find::<run_log_line::Entity>()
                    .filter(run_log_line::Column::RunId.eq(Uuid::from(self.run)))
                    .filter(run_log_line::Column::Offset.gte(from_offset as i64))
                    .order_by_asc(run_log_line::Column::Offset)
                    .limit(limit)
                    .all(txn)
                    .await?)
            })
            .await?;
        rows.into_iter().map(LogLine::try_from).collect()
    }

    /// Whether the run has its outcome (its last line is stored before it).
    pub async fn has_ended(&self) -> Result<bool> {
        let status: Option<String> = self
            .tenant
            .reading(Action::Read, async |txn| {
                Ok(self
                    .tenant
                    .find::<run::Entity>()
                    .filter(run::Column::Id.eq(Uuid::from(self.run)))
                    .select_only()
                    .column(run::Column::Status)
                    .into_tuple()
                    .one(txn)
                    .await?)
            })
            .await?;
        Ok(status
            .as_deref()
            .and_then(RunStatus::parse)
            .is_none_or(RunStatus::is_final))
    }
}
