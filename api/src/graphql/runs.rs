//! Runs and their logs: `runs`, `run`, `runTaskNow`, `stopRun`, and the `runLogs` and
//! `runEvents` subscriptions. Subscriptions follow the catalogue's events (see
//! `cloudtask_catalogue::live_events`), which say what changed, and read the change through the
//! subscriber's tenant handle: a missed or repeated event costs a query, never a gap, a
//! duplicate, or another tenant's data.

use std::collections::VecDeque;
use std::time::Duration;

use async_graphql::connection::Connection;
use async_graphql::{Context, Enum, ID, Object, Subscription};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::Run;
use cloudtask_catalogue::RunLog;
use cloudtask_catalogue::live_events::{Event, Events};
use cloudtask_core::Error;
use cloudtask_core::ids::{RunId, TaskId, WorkerId};
use cloudtask_core::run::LogLine;
use futures_util::Stream;

use super::args::{connection, page_request, parse_id, parse_optional_id};
use super::inputs::RunFilterInput;
use super::tasks::TaskObj;
use super::{state, tenant};
use crate::error::{ApiError, ApiResult};

/// Lines read from the catalogue at a time while catching up. A subscriber whose socket
/// is not read keeps one page: 2,000 such subscriptions hold at most ~75 MB.
const LOG_PAGE: u64 = 250;
/// A subscriber re-reads at least this often even when it hears nothing (a safety net
/// for a notification lost with a connection).
const QUIET_RECHECK: Duration = Duration::from_secs(10);
/// How long a subscriber waits before reading again after the catalogue failed.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunStatus", remote = "cloudtask_core::run::RunStatus")]
pub enum RunStatusGql {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Stopped,
    Lost,
    Skipped,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunTrigger", remote = "cloudtask_core::run::RunTrigger")]
pub enum RunTriggerGql {
    Schedule,
    Manual,
    Retry,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "LogStream", remote = "cloudtask_core::run::LogStream")]
pub enum LogStreamGql {
    Stdout,
    Stderr,
    System,
}

#[derive(Default)]
pub struct RunQuery;

#[Object]
impl RunQuery {
    /// Runs of the caller's tenant, newest first. A fire claimed ahead of its time is
    /// listed once its process has started (or once it has ended without starting).
    #[graphql(complexity = "super::cost::list(first, super::args::DEFAULT_PAGE, child_complexity)")]
    async fn runs(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<RunFilterInput>,
    ) -> ApiResult<Connection<String, RunObj>> {
        let request = page_request(first, after)?;
        let filter = filter.unwrap_or_default().parse()?;
        let page = tenant(ctx).await?.runs(&filter, request).await?;
        Ok(connection(page, request, |r| r.id.into(), RunObj))
    }

    /// A run of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn run(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<RunObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(RunObj(handle.run(parse_id("id", &id)?).await?)))
    }
}

#[derive(Default)]
pub struct RunMutation;

#[Object]
impl RunMutation {
    /// Queues a manual run now; the task's worker starts it (QUEUED, then RUNNING).
    async fn run_task_now(&self, ctx: &Context<'_>, id: ID) -> ApiResult<RunObj> {
        let handle = tenant(ctx).await?;
        Ok(RunObj(handle.queue_run(parse_id("id", &id)?).await?))
    }

    /// Stops a run: a queued one at once, a running one through its worker, which
    /// terminates its process group and reports it STOPPED.
    async fn stop_run(&self, ctx: &Context<'_>, id: ID) -> ApiResult<RunObj> {
        let handle = tenant(ctx).await?;
        Ok(RunObj(handle.request_stop(parse_id("id", &id)?).await?))
    }
}

#[derive(Default)]
pub struct RunSubscription;

#[Subscription]
impl RunSubscription {
    /// The run's stored lines from `fromOffset` (default 0), then its new lines as they
    /// are stored, in order, each once; completes when the run has ended and every line is
    /// delivered. A subscriber that reconnects passes the offset after the last line it
    /// got.
    async fn run_logs(
        &self,
        ctx: &Context<'_>,
        run_id: ID,
        from_offset: Option<i32>,
    ) -> Result<impl Stream<Item = LogLineObj> + use<>, ApiError> {
        let handle = tenant(ctx).await?.clone();
        let run: RunId = parse_id("runId", &run_id)?;
        let from = from_offset.unwrap_or(0);
        if from < 0 {
            return Err(Error::bad_input("fromOffset", "must not be negative").into());
        }
        let log = handle.run_log(run).await?;
        let events = state(ctx).catalogue.events().await?;
        let follow = LogFollow::new(log, events, run, from as u64);
        Ok(futures_util::stream::unfold(
            follow,
            |mut follow| async move {
                let line = follow.next_line().await?;
                Some((LogLineObj(line), follow))
            },
        ))
    }

    /// Runs of the tenant (or of one task) as they are created and change status.
    async fn run_events(
        &self,
        ctx: &Context<'_>,
        task_id: Option<ID>,
    ) -> Result<impl Stream<Item = RunObj> + use<>, ApiError> {
        let handle = tenant(ctx).await?.clone();
        handle.role().await?;
        let task: Option<TaskId> = parse_optional_id("taskId", task_id.as_ref())?;
        if let Some(task) = task {
            handle.task(task).await?;
        }
        let events = state(ctx).catalogue.events().await?;
        let tenant_id = handle.tenant_id();
        Ok(futures_util::stream::unfold(
            (handle, events),
            move |(handle, mut events)| async move {
                loop {
                    let (run, of_task) = match events.next().await? {
                        Event::Run {
                            tenant,
                            task: of_task,
                            run,
                        } if tenant == tenant_id => (run, of_task),
                        _ => continue,
                    };
                    if task.is_some_and(|t| t != of_task) {
                        continue;
                    }
                    match handle.run(run).await {
                        // A fire claimed and not started is not news yet: its start is.
                        Ok(run) if run.is_claimed_only() => continue,
                        Ok(run) => return Some((RunObj(run), (handle, events))),
                        Err(e) => tracing::warn!(error = %e, %run, "run event not readable"),
                    }
                }
            },
        ))
    }
}

/// One fire of a task, or one manual run, and what became of it.
pub struct RunObj(pub Run);

/// Most log lines `Run.logs` returns at once.
pub const MAX_LOG_PAGE: i32 = 5_000;

#[Object(name = "Run")]
impl RunObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn task(&self, ctx: &Context<'_>) -> ApiResult<TaskObj> {
        Ok(tenant(ctx).await?.task(self.0.task_id).await?.into())
    }
    /// The task version the run ran.
    async fn task_version(&self) -> u32 {
        self.0.task_version
    }
    /// The fire time (UTC) this run is for; for a manual run, when it was asked for.
    async fn scheduled_at(&self) -> DateTime<Utc> {
        self.0.scheduled_at
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.0.started_at
    }
    async fn finished_at(&self) -> Option<DateTime<Utc>> {
        self.0.finished_at
    }
    async fn status(&self) -> RunStatusGql {
        self.0.status.into()
    }
    async fn trigger(&self) -> RunTriggerGql {
        self.0.trigger.into()
    }
    /// 0 for the first attempt of a fire, then 1, 2… for retries.
    async fn attempt(&self) -> u32 {
        self.0.attempt
    }
    async fn exit_code(&self) -> Option<i32> {
        self.0.exit_code
    }
    /// The signal that ended the process, if one did.
    async fn signal(&self) -> Option<i32> {
        self.0.signal
    }
    /// Why the run failed, was skipped, stopped or lost.
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    /// Why the run stands where it does: set on every run that has ended (a limit it
    /// hit wins over a stop or timeout's own reason), and on a queued run no live worker
    /// can take (`WAITING_FOR_WORKER`).
    async fn reason(&self) -> Option<super::limits::RunReasonGql> {
        self.0.reason.map(Into::into)
    }
    /// The reason in words: the run's own message when it has one (an exit code, the
    /// worker's words), else what the reason means.
    async fn reason_message(&self) -> Option<String> {
        let reason = self.0.reason?;
        Some(match &self.0.error {
            Some(error) => error.clone(),
            None => reason.describe().to_owned(),
        })
    }
    /// The worker that ran it.
    async fn worker(&self) -> Option<&str> {
        self.0.worker.as_ref().map(WorkerId::as_str)
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// When retention deleted the run's lines (its outcome is kept); null while they
    /// are kept.
    async fn logs_pruned_at(&self) -> Option<DateTime<Utc>> {
        self.0.logs_pruned_at
    }
    /// Log lines from `fromOffset` (default 0), in order, at most `limit` (default and
    /// maximum 5000).
    #[graphql(complexity = "super::cost::list(Some(limit), MAX_LOG_PAGE, child_complexity)")]
    async fn logs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 0)] from_offset: i32,
        #[graphql(default = 5000)] limit: i32,
    ) -> ApiResult<Vec<LogLineObj>> {
        if from_offset < 0 {
            return Err(Error::bad_input("fromOffset", "must not be negative").into());
        }
        if !(0..=MAX_LOG_PAGE).contains(&limit) {
            return Err(
                Error::bad_input("limit", format!("must be between 0 and {MAX_LOG_PAGE}")).into(),
            );
        }
        let lines = tenant(ctx)
            .await?
            .logs_of(&self.0, from_offset as u64, limit as u64)
            .await?;
        Ok(lines.into_iter().map(LogLineObj).collect())
    }
}

pub struct LogLineObj(pub LogLine);

#[Object(name = "LogLine")]
impl LogLineObj {
    async fn offset(&self) -> u64 {
        self.0.offset
    }
    async fn stream(&self) -> LogStreamGql {
        self.0.stream.into()
    }
    async fn at(&self) -> DateTime<Utc> {
        self.0.at
    }
    async fn text(&self) -> &str {
        &self.0.text
    }
}

/// Follows one run's log: what is stored from `next` on, then what is stored later.
///
/// A run's lines are stored in offset order (its worker reports them in order, and the
/// spool replays them in order), so "from `next` on" never skips one. Once a read has
/// found everything stored, the follower waits for an event before it reads again (the
/// events are followed from before the first read, so none is missed in between); the
/// run's status is read only when it may have changed: at the start, after a status
/// event, a resync or a quiet spell.
struct LogFollow {
    log: RunLog,
    events: Events,
    run: RunId,
    /// The offset of the next line to deliver.
    next: u64,
    buffer: VecDeque<LogLine>,
    /// Everything stored at the last read has been read: wait for news first.
    caught_up: bool,
    /// The run may have ended since its status was last read.
    may_have_ended: bool,
    /// The run has ended: read what is left, then complete.
    ending: bool,
    ended: bool,
}

impl LogFollow {
    fn new(log: RunLog, events: Events, run: RunId, next: u64) -> LogFollow {
        LogFollow {
            log,
            events,
            run,
            next,
            buffer: VecDeque::new(),
            caught_up: false,
            may_have_ended: true,
            ending: false,
            ended: false,
        }
    }

    async fn next_line(&mut self) -> Option<LogLine> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Some(line);
            }
            if self.ended {
                return None;
            }
            if self.caught_up {
                if !self.wait().await {
                    return None;
                }
                self.caught_up = false;
            }
            if let Err(e) = self.read().await {
                tracing::warn!(error = %e, run = %self.run, "reading the log failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }

    /// Reads a page of what is stored from `next` on; caught up when that was all.
    async fn read(&mut self) -> Result<(), Error> {
        if self.fetch().await? == LOG_PAGE as usize {
            return Ok(()); // more may be stored
        }
        if self.ending {
            self.ended = true;
            return Ok(());
        }
        if self.may_have_ended {
            let ended = self.log.has_ended().await?;
            self.may_have_ended = false;
            if ended {
                // A run's outcome is reported after its last line: what was stored
                // between the read and the status is all that is left to read.
                self.ending = true;
                return Ok(());
            }
        }
        self.caught_up = true;
        Ok(())
    }

    /// Reads up to a page into the buffer; how many lines it got.
    async fn fetch(&mut self) -> Result<usize, Error> {
        let lines = self.log.lines(self.next, LOG_PAGE).await?;
        if let Some(last) = lines.last() {
            self.next = last.offset + 1;
        }
        let read = lines.len();
        self.buffer.extend(lines);
        Ok(read)
    }

    /// Waits until something may have changed for this run. False once the catalogue is
    /// gone.
    async fn wait(&mut self) -> bool {
        let quiet = tokio::time::sleep(QUIET_RECHECK);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                event = self.events.next() => match event {
                    Some(Event::Logs { run, next }) if run == self.run && next > self.next => return true,
                    Some(Event::Run { run, .. }) if run == self.run => break,
                    Some(Event::Resync) => break,
                    Some(_) => continue,
                    None => return false,
                },
                _ = &mut quiet => break,
            }
        }
        self.may_have_ended = true;
        true
    }
}
