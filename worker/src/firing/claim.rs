//! Claims: every fire is claimed through the API before anything starts, and a refused
//! claim starts nothing. A scheduled fire is claimed `CLAIM_AHEAD` before its time and,
//! once its claim is in, its shell is staged (started, holding before the command:
//! `exec::stage`), so at the fire time only the release is left. A claimed fire that is
//! not started after all (the task changed, moved or was paused in between, the worker
//! could not fire it on time, an overlap SKIP) is reported SKIPPED; its held shell is
//! killed unrun. Fires that are not run get a SKIPPED record all the same.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_coord::layout::TaskNode;
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::protocol::Claim;
use cloudtask_core::run::{RunStatus, RunTrigger};
use cloudtask_core::task::MisfirePolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::start::run_spec;
use super::timers::LATE;
use super::{Actor, Shared};
use crate::backoff::Backoff;
use crate::client::CallError;
use crate::exec::{Staged, stage};
use crate::report::Report;

/// A scheduled fire's claim is retried this long while the API is unreachable (longer
/// for `RUN_ONCE`: its grace period).
const CLAIM_PATIENCE: Duration = Duration::from_secs(5);

/// A fire claimed ahead of its time. `result` turns `Some(Some(run))` once the claim is
/// in, `Some(None)` when it was refused or given up (then recorded as missed); closed
/// when the claim's job ended without an answer (shutdown).
pub(super) struct PreClaim {
    pub claim: Claim,
    pub result: watch::Receiver<Option<Option<RunId>>>,
    /// The fire's shell, staged before the answer is given (with the task version it
    /// was staged from); taken when the fire starts, killed when it does not.
    pub staged: StagedSlot,
}

pub(super) type StagedSlot = Arc<Mutex<Option<(u32, Staged)>>>;

impl PreClaim {
    /// The claimed run, once the claim has an answer.
    pub async fn run(mut self) -> Option<RunId> {
        match self.result.wait_for(Option::is_some).await {
            Ok(answer) => answer.flatten(),
            Err(_) => None,
        }
    }
}

/// Claims a scheduled fire, retrying while the API is unreachable for as long as the
/// misfire policy allows; None when it is refused or given up (then recorded SKIPPED).
pub(super) async fn claim_fire(
    shared: &Shared,
    node: &TaskNode,
    claim: &Claim,
    stop: &CancellationToken,
) -> Option<RunId> {
    let spec = &node.spec;
    let patience = match spec.misfire_policy {
        MisfirePolicy::RunOnce => {
            Duration::from_secs(spec.misfire_grace_seconds as u64).max(CLAIM_PATIENCE)
        }
        MisfirePolicy::Skip => CLAIM_PATIENCE,
    };
    let give_up = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match shared.claims.claim(claim.clone()).await {
            Ok(run_id) => return Some(run_id),
            Err(CallError::Refused(why)) => {
                tracing::debug!(task = %claim.task_id, at = %claim.scheduled_at, %why, "claim refused");
                // Claimed by another worker already (the record exists), or not runnable
                // any more: paused or moved while this claim waited for the API. A fire
                // that was due still needs its record; the API keeps it single and takes
                // it only if the fire was due.
                let mut missed = claim.clone();
                missed.status = RunStatus::Skipped;
                missed.reason = Some(format!("misfire: the claim was refused ({why})"));
                tokio::spawn(record(shared.clone(), missed));
                return None;
            }
            Err(CallError::Unavailable(why)) => {
                if tokio::time::Instant::now() >= give_up || stop.is_cancelled() {
                    tracing::warn!(task = %claim.task_id, at = %claim.scheduled_at, %why,
                        "cannot claim the fire in time; recording it as missed");
                    tokio::spawn(record_missed(shared.clone(), claim.clone()));
                    return None;
                }
                if !backoff.wait(stop).await {
                    // Stopped (the task was paused or moved) while the API was away: the
                    // fire still gets its record, or the ledger would have a hole.
                    tokio::spawn(record_missed(shared.clone(), claim.clone()));
                    return None;
                }
            }
        }
    }
}

/// A fire that could not be claimed in time is recorded SKIPPED once the API is back.
pub(super) async fn record_missed(shared: Shared, mut claim: Claim) {
    claim.status = RunStatus::Skipped;
    claim.reason = Some("misfire: the API could not be reached in time".into());
    record(shared, claim).await;
}

/// Records a fire that is not run (a SKIPPED claim), retrying until the API takes it
/// (or refuses it: recorded already, or not due).
pub(super) async fn record(shared: Shared, claim: Claim) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        match shared.claims.claim(claim.clone()).await {
            Ok(_) | Err(CallError::Refused(_)) => return,
            Err(CallError::Unavailable(_)) => {
                if !backoff.wait(&shared.shutdown).await {
                    return;
                }
            }
        }
    }
}

impl Actor {
    /// The task's claimed fires that will not start now: recorded SKIPPED.
    pub(super) fn abandon_claims(&mut self, task: TaskId, reason: &str) {
        let keys: Vec<(TaskId, DateTime<Utc>)> = self
            .preclaims
            .keys()
            .filter(|(t, _)| *t == task)
            .copied()
            .collect();
        for key in keys {
            if let Some(claimed) = self.preclaims.remove(&key) {
                self.abandon(claimed, reason);
            }
        }
    }

    /// A claimed fire that is not started: once its claim is in, the API hears why (and
    /// records it SKIPPED, or drops it when the fire was not due after all).
    pub(super) fn abandon(&mut self, claimed: PreClaim, reason: &str) {
        let reporter = self.shared.reporter.clone();
        let reason = reason.to_owned();
        self.jobs.spawn(async move {
            if let Some(run) = claimed.run().await {
                reporter.send(Report::Abandon { run, reason });
            }
        });
    }

    /// Records a fire that will not run, retrying until the API takes it.
    pub(super) fn record_skipped(
        &mut self,
        task: TaskId,
        node: &TaskNode,
        scheduled_at: DateTime<Utc>,
        reason: &str,
    ) {
        let claim = Claim {
            task_id: task,
            scheduled_at,
            attempt: 0,
            task_version: node.version,
            worker: self.shared.worker.clone(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Skipped,
            reason: Some(reason.to_owned()),
        };
        self.jobs.spawn(record(self.shared.clone(), claim));
    }

    /// Claims the fires due within `CLAIM_AHEAD`.
    pub(super) fn claim_due(&mut self) {
        let now = self.clock.now();
        while let Some(fire) = self.timers.pop_claim(now) {
            let (task, fire_at) = (fire.task, fire.at);
            let Some(entry) = self.tasks.get(&task) else {
                continue;
            };
            if entry.generation != fire.generation
                || entry.cursor.is_none()
                || !self.is_active(task)
            {
                continue;
            }
            if now - fire_at > LATE || self.preclaims.contains_key(&(task, fire_at)) {
                continue; // a misfire (the fire accounts for it), or claimed already
            }
            let Some(node) = entry.node.clone() else {
                continue;
            };
            self.claim_ahead(task, fire_at, node);
        }
    }

    /// Claims one fire ahead of its time, and stages its shell once the claim is in.
    fn claim_ahead(&mut self, task: TaskId, fire_at: DateTime<Utc>, node: TaskNode) {
        let claim = Claim {
            task_id: task,
            scheduled_at: fire_at,
            attempt: 0,
            task_version: node.version,
            worker: self.shared.worker.clone(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Running,
            reason: None,
        };
        let (tx, rx) = watch::channel(None);
        let staged = StagedSlot::default();
        self.preclaims.insert(
            (task, fire_at),
            PreClaim {
                claim: claim.clone(),
                result: rx,
                staged: staged.clone(),
            },
        );
        let shared = self.shared.clone();
        self.jobs.spawn(async move {
            let stop = shared.shutdown.clone();
            let run = claim_fire(&shared, &node, &claim, &stop).await;
            // Staged when its package is ready. A download would hold the answer
            // back: it starts now, in the background, and the fire waits for it at
            // its time (later fires are staged).
            let package = node.spec.package_sha256.clone();
            if let Some(run) = run
                && !stop.is_cancelled()
            {
                match shared.packages.cached(package.as_deref()) {
                    Some(workdir) => {
                        let env = shared.claims.envs().of(task, node.version);
                        let identity = shared.packages.identity();
                        let spec = run_spec(&node, run, &claim, env, workdir, identity);
                        // Off the runtime's threads: starting a shell and putting it in
                        // its cgroup block (see `exec::stage`).
                        let containment = shared.limits.containment.clone();
                        let shell = tokio::task::spawn_blocking(move || stage(spec, &containment))
                            .await
                            .ok()
                            .flatten();
                        if let Some(shell) = shell {
                            *staged.lock().expect("staged slot") = Some((node.version, shell));
                        }
                    }
                    None => {
                        let packages = shared.packages.clone();
                        tokio::spawn(async move {
                            // Errors are the fire's to report, at its time.
                            let _ = packages.workdir(package.as_deref()).await;
                        });
                    }
                }
            }
            let _ = tx.send(Some(run));
        });
    }
}
