//! The overlap policy: what a fire does about a run of its task still going. A run is
//! going while its processes are: from their start to the end of the last of them
//! ([`Live`]). A run waiting for its claim's answer, one whose reports are still on their
//! way to a slow API, or one waiting out a retry's backoff has no process, and overlaps
//! nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudtask_core::ids::TaskId;
use cloudtask_core::task::OverlapPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Overlap {
    /// Starts at once: nothing is running, or the policy allows overlap.
    StartNow,
    /// Recorded SKIPPED.
    Skip,
    /// Starts once the running runs, stopped, have ended.
    Replace,
}

/// The one place that decides it, for the pass that lets staged shells go and for the
/// dispatch of every fire.
pub(super) fn overlap(policy: OverlapPolicy, running: bool) -> Overlap {
    match policy {
        _ if !running => Overlap::StartNow,
        OverlapPolicy::Allow => Overlap::StartNow,
        OverlapPolicy::Skip => Overlap::Skip,
        OverlapPolicy::Replace => Overlap::Replace,
    }
}

/// The runs of each task whose processes are going on this worker.
#[derive(Clone, Default)]
pub(super) struct Live {
    counts: Arc<Mutex<HashMap<TaskId, usize>>>,
    /// Woken whenever a run's processes end.
    ended: Arc<tokio::sync::Notify>,
}

impl Live {
    /// Whether a run of `task` has processes going.
    pub fn going(&self, task: TaskId) -> bool {
        self.counts
            .lock()
            .expect("live runs")
            .get(&task)
            .is_some_and(|n| *n > 0)
    }

    /// A run of `task` starts its processes: counted until the guard goes.
    pub fn enter(&self, task: TaskId) -> LiveGuard {
        self.try_enter(task, false).expect("not exclusive")
    }

    /// [`Live::enter`] for a scheduled fire of a SKIP task, checked again at its start: a
    /// fire dispatched while nothing ran, whose claim answer came late, may find another
    /// run of the task going by then. It waits up to `patience` for that one's processes
    /// to end (a short program's will), and is None (not run: overlap) if they go on.
    pub async fn enter_alone(&self, task: TaskId, patience: Duration) -> Option<LiveGuard> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if let Some(guard) = self.try_enter(task, true) {
                return Some(guard);
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return None;
            }
        }
    }

    fn try_enter(&self, task: TaskId, alone: bool) -> Option<LiveGuard> {
        let mut counts = self.counts.lock().expect("live runs");
        let count = counts.entry(task).or_default();
        if alone && *count > 0 {
            return None;
        }
        *count += 1;
        Some(LiveGuard {
            live: self.clone(),
            task,
        })
    }
}

/// One run's processes, counted while they go.
pub(super) struct LiveGuard {
    live: Live,
    task: TaskId,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut counts = self.live.counts.lock().expect("live runs");
        if let Some(count) = counts.get_mut(&self.task) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.task);
            }
        }
        drop(counts);
        self.live.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_counts_while_its_processes_go_and_a_late_skip_fire_waits_a_little() {
        let live = Live::default();
        let task = TaskId::new();
        assert!(!live.going(task));
        let first = live.enter(task);
        assert!(live.going(task));
        let patience = Duration::from_millis(50);
        assert!(
            live.enter_alone(task, patience).await.is_none(),
            "still going"
        );
        // Processes that end within the patience let it in.
        let later = {
            let live = live.clone();
            tokio::spawn(async move { live.enter_alone(task, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let second = later.await.unwrap().expect("in once the first ended");
        assert!(live.going(task));
        drop(second);
        assert!(!live.going(task), "the processes ended: nothing overlaps");
    }

    #[test]
    fn a_fire_with_nothing_running_starts_whatever_the_policy() {
        for policy in [
            OverlapPolicy::Skip,
            OverlapPolicy::Allow,
            OverlapPolicy::Replace,
        ] {
            assert_eq!(overlap(policy, false), Overlap::StartNow, "{policy:?}");
        }
    }

    #[test]
    fn a_fire_over_a_running_one_follows_the_policy() {
        assert_eq!(overlap(OverlapPolicy::Skip, true), Overlap::Skip);
        assert_eq!(overlap(OverlapPolicy::Allow, true), Overlap::StartNow);
        assert_eq!(overlap(OverlapPolicy::Replace, true), Overlap::Replace);
    }
}
