//! Catch-up and misfires: the fires that came due while nobody could run them. A newly
//! assigned task first asks the API where its fires stand (the latest fire claimed, or
//! the task's last change); a timer that goes off late (the worker was stopped or
//! suspended, or the clock jumped) does the same from that fire. `SKIP` records each
//! missed fire as a SKIPPED run; `RUN_ONCE` runs the latest one that is still within the
//! grace period and records the rest.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::TaskId;
use cloudtask_core::run::RunTrigger;
use cloudtask_core::schedule::Schedule;
use cloudtask_core::task::{MisfirePolicy, TaskSpec};

use super::{Actor, Event};
use crate::backoff::Backoff;
use crate::client::CallError;

/// At most this many missed fires are accounted for at once (the latest ones).
const MAX_MISFIRES: usize = 1_000;

/// What becomes of the fires missed in a stretch of time.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Missed {
    /// Recorded SKIPPED.
    pub skipped: Vec<DateTime<Utc>>,
    /// Run after all: the latest, under `RUN_ONCE` within the grace period.
    pub run_once: Option<DateTime<Utc>>,
}

/// The fires of `schedule` due in (since, now], and what `spec`'s misfire policy makes
/// of them.
pub(super) fn missed_fires(
    schedule: &Schedule,
    spec: &TaskSpec,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Missed {
    let mut missed = Vec::new();
    let mut at = since;
    while let Some(next) = schedule.next_after(at) {
        if next > now {
            break;
        }
        missed.push(next);
        at = next;
    }
    if missed.len() > MAX_MISFIRES {
        missed.drain(..missed.len() - MAX_MISFIRES);
    }
    let grace = chrono::Duration::seconds(spec.misfire_grace_seconds as i64);
    let run_once = match spec.misfire_policy {
        MisfirePolicy::RunOnce => missed.last().copied().filter(|at| now - *at <= grace),
        MisfirePolicy::Skip => None,
    };
    if run_once.is_some() {
        missed.pop();
    }
    Missed {
        skipped: missed,
        run_once,
    }
}

impl Actor {
    /// Asks the API where the task's fires stand; [`Actor::caught_up`] takes the answer.
    pub(super) fn ask_fire_cursor(&mut self, task: TaskId) {
        let client = self.shared.client.clone();
        let events = self.shared.events.clone();
        let shutdown = self.shared.shutdown.clone();
        let permits = self.shared.catch_ups.clone();
        self.jobs.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                match client.fire_cursor(task).await {
                    Ok(since) => {
                        let _ = events.send(Event::CaughtUp { task, since });
                        return;
                    }
                    Err(CallError::Refused(why)) => {
                        tracing::warn!(%task, %why, "no fire cursor for the task");
                        return;
                    }
                    Err(CallError::Unavailable(_)) => {
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// The takeover catch-up: account for the fires due in (since, now], then arm.
    pub(super) fn caught_up(&mut self, task: TaskId, since: DateTime<Utc>) {
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        entry.catching_up = false;
        self.account_missed(task, since, "misfire: no worker could run it on time");
    }

    /// Records (or runs once) the fires due in (since, now] that nobody ran, then arms
    /// the task from now.
    pub(super) fn account_missed(&mut self, task: TaskId, since: DateTime<Utc>, reason: &str) {
        let now = self.clock.now();
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        let (Some(schedule), Some(node)) = (entry.schedule.clone(), entry.node.clone()) else {
            return;
        };
        entry.cursor = Some(now);
        if !node.paused {
            let missed = missed_fires(&schedule, &node.spec, since, now);
            for at in missed.skipped {
                match self.preclaims.remove(&(task, at)) {
                    Some(claimed) => self.abandon(claimed, reason),
                    None => self.record_skipped(task, &node, at, reason),
                }
            }
            if let Some(at) = missed.run_once {
                self.dispatch(task, at, 0, RunTrigger::Schedule);
            }
        }
        self.arm(task, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn every_minute(policy: MisfirePolicy, grace: u32) -> (Schedule, TaskSpec) {
        let mut spec = TaskSpec::new("0 * * * * *", "true");
        spec.misfire_policy = policy;
        spec.misfire_grace_seconds = grace;
        (spec.parse_schedule().unwrap(), spec)
    }

    fn minutes(list: &[u32]) -> Vec<DateTime<Utc>> {
        list.iter()
            .map(|m| at(&format!("2030-01-01T10:{m:02}:00Z")))
            .collect()
    }

    const SINCE: &str = "2030-01-01T10:00:30Z";
    const NOW: &str = "2030-01-01T10:05:10Z";

    #[test]
    fn skip_records_every_fire_missed_and_runs_none() {
        let (schedule, spec) = every_minute(MisfirePolicy::Skip, 60);
        let missed = missed_fires(&schedule, &spec, at(SINCE), at(NOW));
        assert_eq!(missed.skipped, minutes(&[1, 2, 3, 4, 5]));
        assert_eq!(missed.run_once, None);
    }

    #[test]
    fn run_once_runs_the_latest_within_its_grace_and_records_the_rest() {
        let (schedule, spec) = every_minute(MisfirePolicy::RunOnce, 60);
        let missed = missed_fires(&schedule, &spec, at(SINCE), at(NOW));
        assert_eq!(missed.skipped, minutes(&[1, 2, 3, 4]));
        assert_eq!(missed.run_once, Some(at("2030-01-01T10:05:00Z")));

        // The latest was due 10 s ago: past a grace of 5 s, it is recorded too.
        let (schedule, spec) = every_minute(MisfirePolicy::RunOnce, 5);
        let missed = missed_fires(&schedule, &spec, at(SINCE), at(NOW));
        assert_eq!(missed.skipped, minutes(&[1, 2, 3, 4, 5]));
        assert_eq!(missed.run_once, None);
    }

    #[test]
    fn nothing_missed_is_nothing_recorded_and_the_bounds_are_exclusive_then_inclusive() {
        let (schedule, spec) = every_minute(MisfirePolicy::RunOnce, 60);
        let quiet = missed_fires(&schedule, &spec, at(SINCE), at("2030-01-01T10:00:59Z"));
        assert!(quiet.skipped.is_empty());
        assert_eq!(quiet.run_once, None);
        // (10:01, 10:02]: the fire at `since` was accounted for, the one at `now` is due.
        let (schedule, spec) = every_minute(MisfirePolicy::Skip, 60);
        let edges = missed_fires(
            &schedule,
            &spec,
            at("2030-01-01T10:01:00Z"),
            at("2030-01-01T10:02:00Z"),
        );
        assert_eq!(edges.skipped, minutes(&[2]));
    }

    #[test]
    fn a_long_outage_accounts_for_the_latest_thousand_fires_only() {
        let mut spec = TaskSpec::new("* * * * * *", "true");
        spec.misfire_policy = MisfirePolicy::Skip;
        let schedule = spec.parse_schedule().unwrap();
        let since = at("2030-01-01T10:00:00Z");
        let now = since + chrono::Duration::seconds(5_000);
        let missed = missed_fires(&schedule, &spec, since, now);
        assert_eq!(missed.skipped.len(), MAX_MISFIRES);
        assert_eq!(missed.skipped.last(), Some(&now));
        assert_eq!(
            missed.skipped[0],
            now - chrono::Duration::seconds(MAX_MISFIRES as i64 - 1)
        );
    }
}
