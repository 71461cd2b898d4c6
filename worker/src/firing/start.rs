//! Starting fires: at a fire's time, the overlap policy decides, the staged shells due
//! together are let go back to back, and each fire's job takes its claim's answer (or
//! claims now: retries, late fires run once), runs the command, reports the outcome and
//! asks for a retry (a new attempt of the same fire after a backoff) when the policy
//! allows.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_coord::layout::TaskNode;
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::protocol::Claim;
use cloudtask_core::run::{LogLine, LogStream, Outcome, RunReason, RunStatus, RunTrigger, not_run};
use cloudtask_core::task::{OverlapPolicy, TaskSpec};
use tokio_util::sync::CancellationToken;

use super::claim::{PreClaim, StagedSlot, claim_fire};
use super::overlap::{Overlap, overlap};
use super::timers::LATE;
use super::{ActiveRun, Actor, Event, Halt, Shared};
use crate::backoff::Backoff;
use crate::exec::{RunSpec, Staged, execute, execute_staged};
use crate::packages::Packages;
use crate::report::Report;

/// Why a fire of a SKIP task is not run.
const OVERLAP_SKIP: &str = not_run::OVERLAP;

/// How long a late scheduled fire of a SKIP task waits for another run's processes to end
/// before it is SKIPPED (see [`super::overlap::Live::enter_alone`]).
const LATE_OVERLAP: std::time::Duration = std::time::Duration::from_secs(1);

/// How a run gets its record before it starts.
pub(super) enum Start {
    /// A scheduled fire or a retry: claimed under its unique key.
    Claim(Claim),
    /// A scheduled fire claimed ahead of its time.
    Claimed(PreClaim),
    /// A manual run queued by a user and handed to this worker.
    Queued(RunId),
}

impl Actor {
    pub(super) fn fire_due(&mut self) {
        let now = self.clock.now();
        let mut due = Vec::new();
        while let Some(fire) = self.timers.pop_fire(now) {
            let (task, at) = (fire.task, fire.at);
            let Some(entry) = self.tasks.get_mut(&task) else {
                continue;
            };
            if entry.generation != fire.generation || entry.cursor.is_none() {
                continue;
            }
            if now - at > LATE {
                // The worker was not running when this was due (stopped, suspended, the
                // clock jumped): a misfire, like the fires after it up to now.
                let since = at - chrono::Duration::milliseconds(1);
                self.account_missed(task, since, "misfire: the worker could not fire it on time");
                continue;
            }
            entry.cursor = Some(at);
            if !self.is_active(task) {
                continue;
            }
            due.push((task, at));
        }
        // The staged shells that go are let go first, back to back (the checks done).
        let mut first = HashSet::new();
        let going: Vec<StagedSlot> = due
            .iter()
            .filter(|(task, _)| first.insert(*task))
            .filter_map(|&(task, at)| self.goes_now(task, at))
            .collect();
        for slot in going {
            if let Some((_, shell)) = slot.lock().expect("staged slot").as_mut() {
                shell.release();
            }
        }
        for (task, at) in due {
            self.arm(task, at);
            self.dispatch(task, at, 0, RunTrigger::Schedule);
        }
    }

    /// The staged shell of a claimed fire due now, when [`Actor::dispatch`] will start
    /// it at once: its claim answer is in (so its job cannot take it for a stopped
    /// fire), it fits the task's spec, and no run of the task is going that it would
    /// wait for or be skipped for. The first fire of a task in a pass only: the
    /// others find it running (a second due at once is rare: a late pass).
    fn goes_now(&self, task: TaskId, at: DateTime<Utc>) -> Option<StagedSlot> {
        let node = self.tasks.get(&task)?.node.as_ref()?;
        let claimed = self.preclaims.get(&(task, at))?;
        if self.overlap(task, node) != Overlap::StartNow || claimed.result.borrow().is_none() {
            return None;
        }
        let slot = claimed.staged.lock().expect("staged slot");
        let (version, shell) = slot.as_ref()?;
        fits(shell, *version, node, &self.shared.packages).then(|| claimed.staged.clone())
    }

    /// What the overlap policy makes of a fire of `task` now: a run of it is going while
    /// its processes are (see [`super::overlap::Live`]).
    fn overlap(&self, task: TaskId, node: &TaskNode) -> Overlap {
        overlap(node.spec.overlap_policy, self.shared.live.going(task))
    }

    pub(super) fn dispatch(
        &mut self,
        task: TaskId,
        scheduled_at: DateTime<Utc>,
        attempt: u32,
        trigger: RunTrigger,
    ) {
        let Some(node) = self.tasks.get(&task).and_then(|e| e.node.clone()) else {
            return;
        };
        let claimed = (trigger == RunTrigger::Schedule && attempt == 0)
            .then(|| self.preclaims.remove(&(task, scheduled_at)))
            .flatten();
        let mut replaced = Vec::new();
        match self.overlap(task, &node) {
            Overlap::StartNow => {}
            Overlap::Skip => {
                let reason = OVERLAP_SKIP;
                match claimed {
                    Some(claimed) => self.abandon(claimed, reason),
                    None => self.record_skipped(task, &node, scheduled_at, reason),
                }
                return;
            }
            Overlap::Replace => {
                for run in &self.runs[&task] {
                    run.stop.stop(RunReason::Replaced);
                    replaced.push(run.ended.clone());
                }
            }
        }
        if let Some(claimed) = claimed {
            // Its staged shell has been let go by `fire_due` if it could; otherwise
            // (it waits, or this is a late fire run once) its job lets it go.
            self.start_run(task, Start::Claimed(claimed), replaced);
            return;
        }
        let claim = Claim {
            task_id: task,
            scheduled_at,
            attempt,
            task_version: node.version,
            worker: self.shared.worker.clone(),
            trigger,
            status: RunStatus::Running,
            reason: None,
        };
        self.start_run(task, Start::Claim(claim), replaced);
    }

    /// Starts a run's job; it first waits for the runs it replaces to end.
    pub(super) fn start_run(
        &mut self,
        task: TaskId,
        start: Start,
        replaced: Vec<CancellationToken>,
    ) {
        let Some(node) = self.tasks.get(&task).and_then(|e| e.node.clone()) else {
            return;
        };
        let id = self.next_run;
        self.next_run += 1;
        let stop = Halt::new(self.shared.shutdown.child_token());
        let ended = CancellationToken::new();
        self.runs.entry(task).or_default().push(ActiveRun {
            id,
            stop: stop.clone(),
            ended: ended.clone(),
        });
        let shared = self.shared.clone();
        let hurry = self.hurry.clone();
        self.jobs.spawn(async move {
            let _ended = ended.drop_guard();
            // REPLACE: the runs it replaces end (stopped) before this one starts.
            for previous in replaced {
                previous.cancelled().await;
            }
            let retry = run_fire(&shared, task, &node, start, &stop, &hurry).await;
            let _ = shared.events.send(Event::Done { task, id, retry });
        });
    }
}

/// One fire: claim, prepare, run, report. Returns the retry to schedule, if any.
async fn run_fire(
    shared: &Shared,
    task: TaskId,
    node: &TaskNode,
    start: Start,
    halt: &Halt,
    hurry: &CancellationToken,
) -> Option<(DateTime<Utc>, u32)> {
    let stop = &halt.token;
    let (run_id, claim, staged) = match start {
        Start::Claim(claim) => (claim_fire(shared, node, &claim, stop).await?, claim, None),
        Start::Claimed(claimed) => claimed_run(shared, node, claimed, stop).await?,
        Start::Queued(run) => match shared.client.start(run, &shared.worker).await {
            Ok(started) => {
                let env = started.env;
                shared.claims.envs().remember(task, node.version, env);
                let claim = Claim {
                    task_id: task,
                    scheduled_at: started.scheduled_at,
                    attempt: started.attempt,
                    task_version: node.version,
                    worker: shared.worker.clone(),
                    trigger: started.trigger,
                    status: RunStatus::Running,
                    reason: None,
                };
                (started.run_id, claim, None)
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "cannot start the queued run");
                return None;
            }
        },
    };
    shared
        .running
        .lock()
        .expect("run registry")
        .insert(run_id, halt.clone());
    let retry = execute_fire(shared, node, run_id, &claim, staged, halt, hurry).await;
    shared.running.lock().expect("run registry").remove(&run_id);
    retry
}

/// The run of a fire claimed ahead, with its staged shell if it may run this fire;
/// None when the claim was refused or the fire stopped before it could start.
async fn claimed_run(
    shared: &Shared,
    node: &TaskNode,
    claimed: PreClaim,
    stop: &CancellationToken,
) -> Option<(RunId, Claim, Option<Staged>)> {
    let claim = claimed.claim.clone();
    let mut waiting = claimed.result.clone();
    let staged = claimed.staged.clone();
    let released = staged
        .lock()
        .expect("staged slot")
        .as_ref()
        .is_some_and(|(_, shell)| shell.released());
    // A shell let go at the fire time is running: it is supervised whatever happens
    // next (its answer was in). Otherwise the answer is usually in already; if the API
    // is slow, wait for it like a claim at the fire time would, unless the fire is
    // stopped first.
    let answer = if released {
        *waiting.borrow()
    } else {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Stopped (moved, paused) before it could start.
                let reporter = shared.reporter.clone();
                tokio::spawn(async move {
                    if let Some(run) = claimed.run().await {
                        reporter.send(Report::Abandon {
                            run,
                            reason: not_run::TASK_MOVED.into(),
                        });
                    }
                });
                return None;
            }
            answer = waiting.wait_for(Option::is_some) => answer.ok().and_then(|a| *a),
        }
    };
    // A shell still held runs only if it fits the spec that runs now (an edit that kept
    // the fire: that shell is killed and the fire starts afresh).
    let shell = staged.lock().expect("staged slot").take();
    let shell = shell
        .filter(|(version, shell)| {
            shell.released() || fits(shell, *version, node, &shared.packages)
        })
        .map(|(_, shell)| shell);
    Some((answer.flatten()?, claim, shell))
}

/// Runs a fire that has its record, reports the outcome, and returns the retry to
/// schedule, if any.
async fn execute_fire(
    shared: &Shared,
    node: &TaskNode,
    run_id: RunId,
    claim: &Claim,
    staged: Option<Staged>,
    halt: &Halt,
    hurry: &CancellationToken,
) -> Option<(DateTime<Utc>, u32)> {
    let stop = &halt.token;
    let spec = &node.spec;
    let workdir = match staged {
        Some(ref shell) => Ok(shell.spec().workdir.clone()),
        None => {
            shared
                .packages
                .workdir(spec.package_sha256.as_deref())
                .await
        }
    };
    // The processes go from here: counted for overlap until they have ended. A scheduled
    // fire of a SKIP task that another run of it overtook meanwhile (this one waited for
    // its claim or its package) is not run; a shell let go already is running, whatever
    // came. (Manual runs never wait for an overlapping run; retries were dispatched
    // through the policy.)
    let released = staged.as_ref().is_some_and(Staged::released);
    let alone = spec.overlap_policy == OverlapPolicy::Skip
        && claim.trigger == RunTrigger::Schedule
        && !released;
    let live = if alone {
        shared.live.enter_alone(claim.task_id, LATE_OVERLAP).await
    } else {
        Some(shared.live.enter(claim.task_id))
    };
    let Some(live) = live else {
        drop(staged);
        shared.reporter.send(Report::Abandon {
            run: run_id,
            reason: OVERLAP_SKIP.into(),
        });
        return None;
    };
    let outcome = match workdir {
        Ok(workdir) => {
            shared.reporter.send(Report::Started {
                run: run_id,
                at: Utc::now(),
            });
            match staged {
                Some(shell) => {
                    execute_staged(shell, shared.limits.clone(), &shared.reporter, stop, hurry)
                        .await
                }
                None => {
                    let env = shared.claims.envs().of(claim.task_id, node.version);
                    let identity = shared.packages.identity();
                    let run = run_spec(node, run_id, claim, env, workdir, identity);
                    execute(&run, shared.limits.clone(), &shared.reporter, stop, hurry).await
                }
            }
        }
        Err(e) => unprepared(shared, run_id, e.to_string()),
    };
    drop(live);
    let outcome = stopped_for(outcome, halt.cause());
    let status = outcome.status;
    shared.reporter.send(Report::Finish {
        run: run_id,
        outcome,
    });
    let wait = retry_after(spec, claim, status)?;
    tokio::select! {
        _ = stop.cancelled() => None,
        _ = tokio::time::sleep(wait) => Some((claim.scheduled_at, claim.attempt + 1)),
    }
}

/// A stopped run's outcome, by why it was stopped: a user's stop or a REPLACE is
/// STOPPED (a limit it hit stays its reason); the platform's (the worker fenced itself
/// off, shut down, or lost the task) is LOST with that reason, and the catalogue queues
/// its retry as the task's policy allows. Any other outcome stands.
fn stopped_for(mut outcome: Outcome, cause: RunReason) -> Outcome {
    if outcome.status != RunStatus::Stopped {
        return outcome;
    }
    if cause.is_platform() {
        outcome.status = RunStatus::Lost;
        outcome.reason = Some(cause);
        outcome.error = Some(format!("stopped: {}", cause.describe()));
    } else if outcome.reason.is_none() {
        outcome.reason = Some(cause);
    }
    outcome
}

/// A run whose package could not be made ready: FAILED, with a SYSTEM line saying why.
fn unprepared(shared: &Shared, run: RunId, message: String) -> Outcome {
    shared.reporter.send(Report::Logs {
        run,
        lines: vec![LogLine {
            offset: 0,
            stream: LogStream::System,
            at: Utc::now(),
            text: message.clone(),
        }],
    });
    Outcome {
        status: RunStatus::Failed,
        exit_code: None,
        signal: None,
        error: Some(message),
        finished_at: Utc::now(),
        reason: Some(RunReason::StartFailed),
    }
}

/// How long after a run that ended `status` its next attempt starts, when it gets
/// one: failed or timed out, scheduled (manual runs are not retried), retries left.
/// The backoff doubles per attempt, with jitter, capped at an hour.
fn retry_after(spec: &TaskSpec, claim: &Claim, status: RunStatus) -> Option<Duration> {
    let retryable = matches!(status, RunStatus::Failed | RunStatus::TimedOut);
    if !retryable || claim.trigger == RunTrigger::Manual || claim.attempt >= spec.max_retries {
        return None;
    }
    let base = Duration::from_secs(spec.retry_backoff_seconds.max(1) as u64);
    let mut delay = Backoff::new(base, Duration::from_secs(3600));
    let mut wait = delay.next_delay();
    for _ in 0..claim.attempt {
        wait = delay.next_delay();
    }
    Some(wait)
}

/// Whether a held shell, staged from task version `version`, may run the fire of
/// `node`: the same version and limits, and its package folder still there (one stat).
fn fits(shell: &Staged, version: u32, node: &TaskNode, packages: &Packages) -> bool {
    // The limits too: a change of the cluster's defaults keeps the task's version, and a
    // staged shell's cgroup has the limits of when it was staged.
    version == node.version
        && shell.spec().limits == node.limits
        && packages
            .cached(node.spec.package_sha256.as_deref())
            .as_ref()
            == Some(&shell.spec().workdir)
}

/// What runs for a claimed fire of the task, with the environment handed with its claim
/// (the mirrored spec has none). None handed: the spec's, for a tree and an API of an
/// earlier version, which mirrored env and handed none.
pub(super) fn run_spec(
    node: &TaskNode,
    run_id: RunId,
    claim: &Claim,
    env: cloudtask_core::protocol::TaskEnv,
    workdir: std::path::PathBuf,
    identity: std::sync::Arc<crate::exec::identity::RunIdentity>,
) -> RunSpec {
    let spec = &node.spec;
    RunSpec {
        run_id,
        task_id: claim.task_id,
        scheduled_at: claim.scheduled_at,
        attempt: claim.attempt,
        command: spec.command.clone(),
        env: if env.is_empty() {
            spec.env.clone()
        } else {
            env
        },
        workdir,
        timeout: spec.timeout_seconds.map(|s| Duration::from_secs(s as u64)),
        identity,
        limits: node.limits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(trigger: RunTrigger, attempt: u32) -> Claim {
        Claim {
            task_id: TaskId::new(),
            scheduled_at: Utc::now(),
            attempt,
            task_version: 1,
            worker: "w1".parse().unwrap(),
            trigger,
            status: RunStatus::Running,
            reason: None,
        }
    }

    #[test]
    fn failed_scheduled_fires_are_retried_with_a_doubling_backoff_until_none_are_left() {
        let mut spec = TaskSpec::new("* * * * * *", "false");
        spec.max_retries = 2;
        spec.retry_backoff_seconds = 10;
        let first = retry_after(&spec, &claim(RunTrigger::Schedule, 0), RunStatus::Failed);
        let first = first.expect("a first retry");
        assert!(first <= Duration::from_secs(10) && first >= Duration::from_millis(7_500));
        let second = retry_after(&spec, &claim(RunTrigger::Retry, 1), RunStatus::TimedOut);
        let second = second.expect("a second retry");
        assert!(second <= Duration::from_secs(20) && second >= Duration::from_secs(15));
        assert_eq!(
            retry_after(&spec, &claim(RunTrigger::Retry, 2), RunStatus::Failed),
            None
        );
    }

    #[test]
    fn a_stop_reads_as_its_cause_a_users_is_stopped_the_platforms_is_lost() {
        let stopped = |reason| Outcome {
            status: RunStatus::Stopped,
            exit_code: None,
            signal: Some(15),
            error: Some("stopped".into()),
            finished_at: Utc::now(),
            reason,
        };
        let user = stopped_for(stopped(None), RunReason::UserStop);
        assert_eq!(
            (user.status, user.reason),
            (RunStatus::Stopped, Some(RunReason::UserStop))
        );
        let replaced = stopped_for(stopped(None), RunReason::Replaced);
        assert_eq!(replaced.reason, Some(RunReason::Replaced));
        // A limit it hit stays its reason under a user's stop.
        let limited = stopped_for(stopped(Some(RunReason::OomKilled)), RunReason::UserStop);
        assert_eq!(limited.reason, Some(RunReason::OomKilled));
        for cause in [RunReason::Fenced, RunReason::Shutdown, RunReason::TaskMoved] {
            let lost = stopped_for(stopped(None), cause);
            assert_eq!((lost.status, lost.reason), (RunStatus::Lost, Some(cause)));
        }
        // A run that ended by itself before the stop took effect keeps its outcome.
        let mut exited = stopped(None);
        exited.status = RunStatus::Succeeded;
        assert_eq!(
            stopped_for(exited, RunReason::Fenced).status,
            RunStatus::Succeeded
        );
    }

    #[test]
    fn successes_stops_and_manual_runs_are_not_retried() {
        let mut spec = TaskSpec::new("* * * * * *", "true");
        spec.max_retries = 3;
        let scheduled = claim(RunTrigger::Schedule, 0);
        for status in [RunStatus::Succeeded, RunStatus::Stopped] {
            assert_eq!(retry_after(&spec, &scheduled, status), None, "{status:?}");
        }
        let manual = claim(RunTrigger::Manual, 0);
        assert_eq!(retry_after(&spec, &manual, RunStatus::Failed), None);
    }
}
