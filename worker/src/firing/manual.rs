//! Manual runs and stops: the commands membership hands over (see
//! `membership::commands` for their order). A run-now command comes after the
//! assignments that hold its task, so its task is either ready (its spec read), or
//! held with its spec still on the way (read on a watch of its own; it was mirrored
//! before the assignment, so it comes), or not this worker's. The run waits in the
//! first case for the spec, and is dropped with its task if the task leaves first.
//! A command for a task not held here waits for the next assignment change only: the
//! scheduler never writes one before the assignment, but a command played ahead of it
//! by hand still runs, and one for a task that has moved on goes (its new owner gets
//! the run from the scheduler). No timer either way.

use std::collections::HashMap;

use cloudtask_coord::layout::CommandNode;
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::run::RunReason;

use super::Actor;
use super::start::Start;

/// Where a task named by a run-now command stands on this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskHere {
    /// Not among the assignments applied.
    NotHeld,
    /// Held; its spec not read yet.
    AwaitingSpec,
    /// Held with its spec: a run can start.
    Ready,
}

/// Manual runs that cannot start yet, by what they wait for.
#[derive(Debug, Default)]
pub(super) struct ManualRuns {
    awaiting_spec: HashMap<TaskId, Vec<RunId>>,
    /// Came for a task not held here: until the next assignment change.
    not_held: Vec<(TaskId, RunId)>,
}

impl ManualRuns {
    /// A run-now command: the run when it can start now.
    pub fn arrived(&mut self, task: TaskId, run: RunId, here: TaskHere) -> Option<RunId> {
        match here {
            TaskHere::Ready => return Some(run),
            TaskHere::AwaitingSpec => self.awaiting_spec.entry(task).or_default().push(run),
            TaskHere::NotHeld => self.not_held.push((task, run)),
        }
        None
    }

    /// The task's spec has been read: the runs that waited for it.
    pub fn spec_read(&mut self, task: TaskId) -> Vec<RunId> {
        self.awaiting_spec.remove(&task).unwrap_or_default()
    }

    /// The assignments changed: the runs that came for a task not held then wait for
    /// its spec if `held` now, and go otherwise (returned).
    pub fn assignments_changed(&mut self, held: impl Fn(TaskId) -> bool) -> Vec<(TaskId, RunId)> {
        let mut gone = Vec::new();
        for (task, run) in std::mem::take(&mut self.not_held) {
            if held(task) {
                self.awaiting_spec.entry(task).or_default().push(run);
            } else {
                gone.push((task, run));
            }
        }
        gone
    }

    /// The task left this worker: its runs go with it (to its next owner).
    pub fn task_left(&mut self, task: TaskId) {
        self.awaiting_spec.remove(&task);
    }
}

impl Actor {
    pub(super) fn command(&mut self, command: CommandNode) {
        match command {
            CommandNode::RunNow { task, run } => {
                let here = match self.tasks.get(&task) {
                    None => TaskHere::NotHeld,
                    Some(entry) if entry.node.is_none() => TaskHere::AwaitingSpec,
                    Some(_) => TaskHere::Ready,
                };
                if let Some(run) = self.manual.arrived(task, run, here) {
                    self.start_run(task, Start::Queued(run), Vec::new());
                }
            }
            CommandNode::Stop { run } => {
                let running = self.shared.running.lock().expect("run registry");
                match running.get(&run) {
                    Some(stop) => stop.stop(RunReason::UserStop),
                    None => tracing::info!(%run, "stop for a run not going here"),
                }
            }
        }
    }

    /// Starts the manual runs that waited for the task's spec, now read.
    pub(super) fn start_manual(&mut self, task: TaskId) {
        if self.tasks.get(&task).is_none_or(|e| e.node.is_none()) {
            return;
        }
        for run in self.manual.spec_read(task) {
            self.start_run(task, Start::Queued(run), Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_for_a_ready_task_starts_at_once() {
        let mut manual = ManualRuns::default();
        let (task, run) = (TaskId::new(), RunId::new());
        assert_eq!(manual.arrived(task, run, TaskHere::Ready), Some(run));
        assert_eq!(manual.spec_read(task), []);
    }

    #[test]
    fn a_run_waits_for_its_tasks_spec_or_goes_with_the_task() {
        let mut manual = ManualRuns::default();
        let (task, first, second) = (TaskId::new(), RunId::new(), RunId::new());
        assert_eq!(manual.arrived(task, first, TaskHere::AwaitingSpec), None);
        assert_eq!(manual.arrived(task, second, TaskHere::AwaitingSpec), None);
        assert_eq!(manual.spec_read(task), [first, second]);
        assert_eq!(manual.spec_read(task), [], "started once");

        let (left, run) = (TaskId::new(), RunId::new());
        manual.arrived(left, run, TaskHere::AwaitingSpec);
        manual.task_left(left);
        assert_eq!(manual.spec_read(left), []);
    }

    #[test]
    fn a_run_for_a_task_not_held_waits_for_the_next_assignment_change_only() {
        let mut manual = ManualRuns::default();
        let (coming, moved) = (TaskId::new(), TaskId::new());
        let (early, stale) = (RunId::new(), RunId::new());
        assert_eq!(manual.arrived(coming, early, TaskHere::NotHeld), None);
        assert_eq!(manual.arrived(moved, stale, TaskHere::NotHeld), None);

        // The change brings one task: its run now waits for the spec; the other goes.
        let gone = manual.assignments_changed(|task| task == coming);
        assert_eq!(gone, [(moved, stale)]);
        assert_eq!(manual.spec_read(moved), []);
        assert_eq!(manual.spec_read(coming), [early]);

        // Nothing is left for a later change.
        assert_eq!(manual.assignments_changed(|_| true), []);
    }
}
