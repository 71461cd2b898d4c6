//! The tasks assigned to this worker: adopted when membership publishes them (each with
//! a watch on its mirrored spec), re-armed when the spec changes, dropped when they leave
//! (moved, paused, deleted) or the epoch ends: then their processes are stopped.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_coord::WatchEvent;
use cloudtask_coord::layout::{self, TaskNode};
use cloudtask_core::ids::TaskId;
use cloudtask_core::run::{RunReason, not_run};
use tokio_util::sync::CancellationToken;

use super::claim::PreClaim;
use super::manual::ManualRuns;
use super::timers::Armed;
use super::{Actor, Event, TaskEntry};
use crate::backoff::Backoff;
use crate::membership::Assignments;

impl Actor {
    pub(super) fn assignments_changed(&mut self, current: Assignments) {
        if current.epoch != self.epoch {
            // A new session, or the worker fenced itself off (a long disconnection):
            // nothing read before may be acted on, and what runs stops in a hurry.
            self.hurry.cancel();
            self.hurry = CancellationToken::new();
            let all: Vec<TaskId> = self.tasks.keys().copied().collect();
            for task in all {
                self.drop_task(task, RunReason::Fenced);
            }
            self.manual = ManualRuns::default();
            self.epoch = current.epoch;
        }
        let gone: Vec<TaskId> = self
            .tasks
            .keys()
            .filter(|t| !current.tasks.contains(t))
            .copied()
            .collect();
        for task in gone {
            self.drop_task(task, RunReason::TaskMoved);
        }
        for task in &current.tasks {
            if !self.tasks.contains_key(task) {
                self.adopt(*task);
            }
        }
        for (task, run) in self
            .manual
            .assignments_changed(|t| current.tasks.contains(&t))
        {
            tracing::info!(%task, %run, "a manual run for a task not assigned here");
        }
    }

    fn adopt(&mut self, task: TaskId) {
        let watcher = CancellationToken::new();
        let generation = self.next_generation();
        self.tasks.insert(
            task,
            TaskEntry {
                watcher: watcher.clone(),
                node: None,
                schedule: None,
                generation,
                cursor: None,
                catching_up: false,
            },
        );
        let path = layout::task(self.cluster, task);
        let reads = self.reads.clone();
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                let read = match reads.get().await {
                    Ok(session) => session.get_and_watch(&path).await,
                    Err(e) => Err(e),
                };
                let watch = match read {
                    Ok((node, watch)) => {
                        backoff.reset();
                        let node = node
                            .and_then(|n| layout::decode::<TaskNode>(&path, &n.data).ok())
                            .map(Box::new);
                        if events.send(Event::Spec(task, node)).is_err() {
                            return;
                        }
                        watch
                    }
                    Err(e) => {
                        tracing::debug!(%task, error = %e, "cannot read the task spec; retrying");
                        if !backoff.wait(&watcher).await {
                            return;
                        }
                        continue;
                    }
                };
                tokio::select! {
                    _ = watcher.cancelled() => return,
                    event = watch.fired() => {
                        if event == WatchEvent::SessionEnded && !backoff.wait(&watcher).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// A generation no task entry has had.
    pub(super) fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    /// The task leaves this worker; its runs stop, for `cause`.
    pub(super) fn drop_task(&mut self, task: TaskId, cause: RunReason) {
        if let Some(entry) = self.tasks.remove(&task) {
            entry.watcher.cancel();
        }
        // Handed to the task's next owner by the scheduler.
        self.manual.task_left(task);
        self.abandon_claims(task, not_run::TASK_MOVED);
        if let Some(runs) = self.runs.get(&task) {
            for run in runs {
                run.stop.stop(cause);
            }
        }
    }

    pub(super) fn stop_all(&mut self) {
        let all: Vec<TaskId> = self.tasks.keys().copied().collect();
        for task in all {
            self.drop_task(task, RunReason::Shutdown);
        }
        let claimed: Vec<PreClaim> = self.preclaims.drain().map(|(_, c)| c).collect();
        for claimed in claimed {
            self.abandon(claimed, not_run::SHUTDOWN);
        }
        for runs in self.runs.values() {
            for run in runs {
                run.stop.stop(RunReason::Shutdown);
            }
        }
    }

    pub(super) fn is_active(&self, task: TaskId) -> bool {
        self.tasks
            .get(&task)
            .and_then(|e| e.node.as_ref())
            .is_some_and(|n| !n.paused)
    }

    pub(super) fn spec_changed(&mut self, task: TaskId, node: Option<TaskNode>) {
        if self.tasks.get(&task).is_none_or(|e| e.node == node) {
            return;
        }
        let generation = self.next_generation();
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        entry.generation = generation;
        entry.schedule = node.as_ref().and_then(|n| match n.spec.validate() {
            Ok(schedule) => Some(schedule),
            Err(e) => {
                tracing::warn!(%task, error = %e, "the mirrored schedule does not parse");
                None
            }
        });
        entry.node = node;
        // Fires claimed ahead under the old spec: kept if the new one fires then too,
        // released if it does not (paused, deleted, rescheduled).
        let firing = entry
            .node
            .as_ref()
            .is_some_and(|n| !n.paused)
            .then(|| entry.schedule.clone())
            .flatten();
        let claimed: Vec<DateTime<Utc>> = self
            .preclaims
            .keys()
            .filter(|(t, _)| *t == task)
            .map(|(_, at)| *at)
            .collect();
        for at in claimed {
            let keep = firing
                .as_ref()
                .is_some_and(|s| s.next_after(at - chrono::Duration::milliseconds(1)) == Some(at));
            if keep {
                // Kept, but its shell was staged from the old spec: killed now; the
                // fire starts from the new one at its time.
                if let Some(claimed) = self.preclaims.get(&(task, at)) {
                    drop(claimed.staged.lock().expect("staged slot").take());
                }
            } else if let Some(claimed) = self.preclaims.remove(&(task, at)) {
                self.abandon(claimed, not_run::TASK_CHANGED);
            }
        }
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        if entry.node.as_ref().is_none_or(|n| n.paused) || entry.schedule.is_none() {
            return;
        }
        match entry.cursor {
            Some(cursor) => {
                // An edit: fire on the new schedule from where the old one stood.
                let from = cursor.max(self.clock.now());
                self.arm(task, from);
            }
            None if !entry.catching_up => {
                entry.catching_up = true;
                self.ask_fire_cursor(task);
            }
            None => {}
        }
    }

    pub(super) fn arm(&mut self, task: TaskId, after: DateTime<Utc>) {
        let Some(entry) = self.tasks.get(&task) else {
            return;
        };
        if let Some(at) = entry.schedule.as_ref().and_then(|s| s.next_after(after)) {
            self.timers.arm(Armed {
                at,
                task,
                generation: entry.generation,
            });
        }
    }
}
