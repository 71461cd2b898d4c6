//! Subscriptions over `/graphql/ws`. Each follows the catalogue's events (see
//! `cloudtask_catalogue::events`), which say what changed, and reads the change from the
//! catalogue through the subscriber's tenant handle: a missed or repeated event costs a
//! query, never a gap, a duplicate, or another tenant's data.

use std::collections::VecDeque;
use std::time::Duration;

use async_graphql::{Context, Enum, ID, SimpleObject, Subscription};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::RunLog;
use cloudtask_catalogue::live_events::{Event, Events, Membership};
use cloudtask_core::Error;
use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId};
use cloudtask_core::run::LogLine;
use futures_util::Stream;

use super::types::{LogLineObj, RunObj, parse_id};
use super::{state, tenant};
use crate::error::ApiError;

/// Lines read from the catalogue at a time while catching up.
const LOG_PAGE: u64 = 1_000;
/// A subscriber re-reads at least this often even when it hears nothing (a safety net
/// for a notification lost with a connection).
const QUIET_RECHECK: Duration = Duration::from_secs(10);
/// How long a subscriber waits before reading again after the catalogue failed.
const RETRY: Duration = Duration::from_secs(1);

pub struct SubscriptionRoot;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "WorkerEventKind")]
pub enum WorkerEventKind {
    Joined,
    /// Left cleanly (shut down).
    Left,
    /// Its session ended without a clean leave; its tasks moved.
    Offline,
}

impl From<Membership> for WorkerEventKind {
    fn from(m: Membership) -> Self {
        match m {
            Membership::Joined => WorkerEventKind::Joined,
            Membership::Left => WorkerEventKind::Left,
            Membership::Offline => WorkerEventKind::Offline,
        }
    }
}

/// A worker joined or left its cluster.
#[derive(SimpleObject)]
pub struct WorkerEvent {
    pub cluster_id: ID,
    /// The worker's name, unique in its cluster.
    pub worker: String,
    pub kind: WorkerEventKind,
    /// When this API heard of it.
    pub at: DateTime<Utc>,
}

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
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
        let task: Option<TaskId> = task_id
            .as_ref()
            .map(|id| parse_id("taskId", id))
            .transpose()?;
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
                        Ok(run) => return Some((RunObj(run), (handle, events))),
                        Err(e) => tracing::warn!(error = %e, %run, "run event not readable"),
                    }
                }
            },
        ))
    }

    /// Workers of the tenant's clusters (or of one cluster) joining and leaving.
    async fn worker_events(
        &self,
        ctx: &Context<'_>,
        cluster_id: Option<ID>,
    ) -> Result<impl Stream<Item = WorkerEvent> + use<>, ApiError> {
        let handle = tenant(ctx).await?;
        let cluster: Option<ClusterId> = cluster_id
            .as_ref()
            .map(|id| parse_id("clusterId", id))
            .transpose()?;
        if let Some(cluster) = cluster {
            handle.cluster(cluster).await?;
        }
        let tenant_id: TenantId = handle.tenant_id();
        let events = state(ctx).catalogue.events().await?;
        Ok(futures_util::stream::unfold(
            events,
            move |mut events| async move {
                loop {
                    if let Event::Worker {
                        tenant,
                        cluster: of_cluster,
                        change,
                        worker,
                    } = events.next().await?
                        && tenant == tenant_id
                        && cluster.is_none_or(|c| c == of_cluster)
                    {
                        let event = WorkerEvent {
                            cluster_id: ID(of_cluster.to_string()),
                            worker,
                            kind: change.into(),
                            at: Utc::now(),
                        };
                        return Some((event, events));
                    }
                }
            },
        ))
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
