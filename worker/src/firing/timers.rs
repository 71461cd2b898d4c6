//! The timer heap: the next fire of every assigned task, and the time to claim it ahead.
//! Two min-heaps for all tasks, so thousands of schedules cost one sleeping future, not
//! one each. Entries carry their task entry's generation: one left by an older spec or
//! an earlier adoption is stale, and the actor skips it when it comes up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::TaskId;

/// Scheduled fires are claimed this long before their time. Well below the session
/// timeout: a worker whose session has ended cannot still hold a claim for a fire that
/// a new owner is due to run.
pub(super) const CLAIM_AHEAD: chrono::Duration = chrono::Duration::milliseconds(400);

/// A timer that goes off this much after its fire time means the worker could not fire
/// on time (it was stopped or suspended, or the clock jumped): the fire is a misfire.
pub(super) const LATE: chrono::Duration = chrono::Duration::seconds(2);

/// A fire of a task entry's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Armed {
    pub at: DateTime<Utc>,
    pub task: TaskId,
    pub generation: u64,
}

/// A fire to claim ahead: (claim time, the fire).
type ClaimAhead = (DateTime<Utc>, Armed);

#[derive(Default)]
pub(super) struct Timers {
    fires: BinaryHeap<Reverse<Armed>>,
    claims: BinaryHeap<Reverse<ClaimAhead>>,
}

impl Timers {
    /// Arms a fire at `fire.at`, and its claim `CLAIM_AHEAD` before.
    pub fn arm(&mut self, fire: Armed) {
        self.fires.push(Reverse(fire));
        self.claims.push(Reverse((fire.at - CLAIM_AHEAD, fire)));
    }

    /// When the earliest fire is due.
    pub fn next_fire(&self) -> Option<DateTime<Utc>> {
        self.fires.peek().map(|Reverse(fire)| fire.at)
    }

    /// When the earliest claim ahead is due.
    pub fn next_claim(&self) -> Option<DateTime<Utc>> {
        self.claims.peek().map(|Reverse((at, _))| *at)
    }

    /// The earliest fire, when it is due at `now`; taken off the heap.
    pub fn pop_fire(&mut self, now: DateTime<Utc>) -> Option<Armed> {
        let Reverse(fire) = self.fires.peek()?;
        if fire.at > now {
            return None;
        }
        self.fires.pop().map(|Reverse(fire)| fire)
    }

    /// The earliest fire to claim, when its claim is due at `now`; taken off the heap.
    pub fn pop_claim(&mut self, now: DateTime<Utc>) -> Option<Armed> {
        let Reverse((at, _)) = self.claims.peek()?;
        if *at > now {
            return None;
        }
        self.claims.pop().map(|Reverse((_, fire))| fire)
    }
}

#[cfg(test)]
mod tests {
    use cloudtask_core::schedule::Schedule;

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn fire(task: TaskId, time: &str, generation: u64) -> Armed {
        Armed {
            at: at(time),
            task,
            generation,
        }
    }

    #[test]
    fn fires_come_up_earliest_first_and_only_once_due() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let mut timers = Timers::default();
        timers.arm(fire(a, "2030-01-01T00:00:05Z", 1));
        timers.arm(fire(b, "2030-01-01T00:00:02Z", 2));
        timers.arm(fire(a, "2030-01-01T00:00:03Z", 3));
        assert_eq!(timers.next_fire(), Some(at("2030-01-01T00:00:02Z")));
        assert_eq!(timers.next_claim(), Some(at("2030-01-01T00:00:01.600Z")));

        // Due only at its time: a claim comes up 400 ms ahead, the fire does not.
        let now = at("2030-01-01T00:00:01.700Z");
        assert_eq!(timers.pop_fire(now), None);
        assert_eq!(
            timers.pop_claim(now),
            Some(fire(b, "2030-01-01T00:00:02Z", 2))
        );
        assert_eq!(timers.pop_claim(now), None);

        let now = at("2030-01-01T00:00:04Z");
        let due: Vec<Armed> = std::iter::from_fn(|| timers.pop_fire(now)).collect();
        assert_eq!(
            due,
            [
                fire(b, "2030-01-01T00:00:02Z", 2),
                fire(a, "2030-01-01T00:00:03Z", 3)
            ]
        );
        assert_eq!(timers.next_fire(), Some(at("2030-01-01T00:00:05Z")));
    }

    #[test]
    fn a_fire_rearmed_from_its_own_time_comes_up_at_the_next_one() {
        // What the actor does at each fire: take it, arm the schedule's next.
        let schedule = Schedule::parse("*/2 * * * * *", "UTC", None, None).unwrap();
        let task = TaskId::new();
        let mut timers = Timers::default();
        let first = schedule.next_after(at("2030-01-01T00:00:00Z")).unwrap();
        timers.arm(Armed {
            at: first,
            task,
            generation: 7,
        });
        let mut fired = Vec::new();
        let mut now = at("2030-01-01T00:00:00Z");
        while fired.len() < 3 {
            now += chrono::Duration::seconds(1);
            while let Some(due) = timers.pop_fire(now) {
                fired.push(due.at);
                let next = schedule.next_after(due.at).unwrap();
                timers.arm(Armed { at: next, ..due });
            }
        }
        assert_eq!(
            fired,
            [
                at("2030-01-01T00:00:02Z"),
                at("2030-01-01T00:00:04Z"),
                at("2030-01-01T00:00:06Z")
            ]
        );
        assert_eq!(timers.next_fire(), Some(at("2030-01-01T00:00:08Z")));
    }
}
