//! The run's state machine, in one place: which status (and reason) each event makes of a
//! run, and which transitions exist at all. Every write of a run's status in the catalogue
//! asks [`step`] first and writes only what it answers (the status the write starts from
//! is the one its statement filters on, so a run that moved meanwhile is left alone).
//!
//! The machine is drawn in the README ("Run states and reasons"); [`allowed`] is its
//! list of transitions, and the property tests below hold [`step`] to it.
//!
//! A claimed fire is RUNNING before its process starts (`started_at` is null until the
//! worker's Started report); it is not listed nor announced until then (see `runs`).
//! Every status but QUEUED and RUNNING is final: nothing moves a run out of it.

use cloudtask_core::run::{Outcome, RunReason, RunStatus};

/// Something that happens to a run, as the catalogue hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// A manual run asked for, or the retry of a lost fire queued.
    Queue,
    /// A worker claims a fire to run it.
    Claim,
    /// A worker records a fire it does not run.
    Record(RunReason),
    /// The scheduler finds nobody to take a queued run (true), or hands it (false).
    Waiting(bool),
    /// A worker starts a queued run.
    Start,
    /// A worker reports how the run ended.
    Finish(RunStatus, RunReason),
    /// A worker gives up a claimed fire before it started.
    Abandon(RunReason),
    /// A user stops the run.
    Stop,
    /// The run's worker is gone (its session ended).
    WorkerLost,
    /// A queued run waited longer than `queue_expiry_secs`.
    Expire,
}

/// What an event does to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The run takes this status and reason.
    To(RunStatus, Option<RunReason>),
    /// A running run is asked to stop: its worker ends it and reports.
    StopRequested,
    /// Nothing changes (the event comes late, or twice).
    Ignore,
    /// The event is refused: the caller answers CONFLICT with this.
    Refuse(&'static str),
}

/// What `event` makes of a run that stands at `current` (None: no run yet).
pub fn step(current: Option<RunStatus>, event: &RunEvent) -> Step {
    use RunEvent as E;
    use RunStatus as S;
    let to = |status, reason| Step::To(status, reason);
    match (current, event) {
        (None, E::Queue) => to(S::Queued, None),
        (None, E::Claim) => to(S::Running, None),
        (None, E::Record(reason)) => to(S::Skipped, Some(skip_reason(*reason))),
        (None, _) => Step::Refuse("no such run"),

        (Some(S::Queued), E::Waiting(true)) => to(S::Queued, Some(RunReason::WaitingForWorker)),
        (Some(S::Queued), E::Waiting(false)) => to(S::Queued, None),
        (Some(S::Queued), E::Start) => to(S::Running, None),
        (Some(S::Queued), E::Stop) => to(S::Stopped, Some(RunReason::UserStop)),
        (Some(S::Queued), E::Expire) => to(S::Failed, Some(RunReason::QueueExpired)),
        (Some(S::Queued), _) => Step::Ignore,

        (Some(S::Running), E::Finish(status, reason)) => {
            let (status, reason) = ending(*status, Some(*reason));
            to(status, Some(reason))
        }
        (Some(S::Running), E::Abandon(reason) | E::Record(reason)) => {
            to(S::Skipped, Some(skip_reason(*reason)))
        }
        (Some(S::Running), E::Stop) => Step::StopRequested,
        (Some(S::Running), E::WorkerLost) => to(S::Lost, Some(RunReason::WorkerLost)),
        (Some(S::Running), _) => Step::Ignore,

        (Some(_), E::Stop) => Step::Refuse("the run has ended already"),
        (Some(_), _) => Step::Ignore,
    }
}

/// The transitions of the machine: from a status (None: the run's creation) to a status
/// with a reason. [`step`] never answers anything else (the property tests hold it to
/// that).
pub fn allowed(from: Option<RunStatus>, to: RunStatus, reason: Option<RunReason>) -> bool {
    use RunReason as R;
    use RunStatus as S;
    let limit = reason.is_some_and(RunReason::is_limit);
    let skip = matches!(
        reason,
        Some(R::OverlapSkip | R::Misfire | R::TaskChanged | R::TaskMoved | R::Shutdown)
    );
    match (from, to) {
        (None, S::Queued) => reason.is_none(),
        (None, S::Running) => reason.is_none(),
        (None, S::Skipped) => skip,
        (Some(S::Queued), S::Queued) => matches!(reason, None | Some(R::WaitingForWorker)),
        (Some(S::Queued), S::Running) => reason.is_none(),
        (Some(S::Queued), S::Stopped) => reason == Some(R::UserStop),
        (Some(S::Queued), S::Failed) => reason == Some(R::QueueExpired),
        (Some(S::Running), S::Succeeded) => reason == Some(R::Exit),
        (Some(S::Running), S::Failed) => {
            limit || matches!(reason, Some(R::Exit | R::Signal | R::StartFailed))
        }
        (Some(S::Running), S::TimedOut) => limit || reason == Some(R::Timeout),
        (Some(S::Running), S::Stopped) => {
            limit || matches!(reason, Some(R::UserStop | R::TaskPaused | R::Replaced))
        }
        (Some(S::Running), S::Lost) => reason.is_some_and(RunReason::is_platform),
        (Some(S::Running), S::Skipped) => skip,
        _ => false,
    }
}

/// A worker's outcome made whole: the reason an earlier worker leaves out is filled in
/// from the status, the exit code and the signal; a reason that does not go with the
/// status gives way to the status's own.
pub fn ending(status: RunStatus, reason: Option<RunReason>) -> (RunStatus, RunReason) {
    use RunReason as R;
    use RunStatus as S;
    let given = reason.filter(|r| allowed(Some(S::Running), status, Some(*r)));
    let reason = given.unwrap_or(match status {
        S::Succeeded | S::Failed => R::Exit,
        S::TimedOut => R::Timeout,
        S::Stopped => R::UserStop,
        S::Lost => R::WorkerLost,
        S::Skipped => R::Misfire,
        // Not an outcome (refused before it gets here); a lost run is the honest read.
        S::Queued | S::Running => return (S::Lost, R::WorkerLost),
    });
    (status, reason)
}

/// The outcome a worker reports, with its reason made whole (see [`ending`]); a FAILED
/// run with no reason says EXIT, SIGNAL or START_FAILED by what it carries.
pub fn complete(outcome: &Outcome) -> Outcome {
    let mut reason = outcome.reason;
    if outcome.status == RunStatus::Failed && reason.is_none() {
        reason = Some(match (outcome.exit_code, outcome.signal) {
            (Some(_), _) => RunReason::Exit,
            (None, Some(_)) => RunReason::Signal,
            (None, None) => RunReason::StartFailed,
        });
    }
    let (status, reason) = ending(outcome.status, reason);
    Outcome {
        status,
        reason: Some(reason),
        ..outcome.clone()
    }
}

/// A run its worker stopped because the task left it (TASK_MOVED, LOST): when the task
/// was paused (a user's doing, not the platform's), STOPPED with TASK_PAUSED instead, and
/// not retried.
pub fn left_paused(outcome: &Outcome) -> Outcome {
    if (outcome.status, outcome.reason) != (RunStatus::Lost, Some(RunReason::TaskMoved)) {
        return outcome.clone();
    }
    Outcome {
        status: RunStatus::Stopped,
        reason: Some(RunReason::TaskPaused),
        error: Some("stopped: the task was paused".into()),
        ..outcome.clone()
    }
}

/// A fire not run: its reason, from what the worker said.
fn skip_reason(reason: RunReason) -> RunReason {
    if allowed(None, RunStatus::Skipped, Some(reason)) {
        reason
    } else {
        RunReason::Misfire
    }
}

/// The reason of a fire not run, from the worker's words (see
/// [`cloudtask_core::run::not_run`]).
pub fn skip_reason_of(text: Option<&str>) -> RunReason {
    RunReason::of_not_run(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = RunStatus> {
        prop::sample::select(RunStatus::ALL.to_vec())
    }

    fn reason() -> impl Strategy<Value = RunReason> {
        prop::sample::select(RunReason::ALL.to_vec())
    }

    fn event() -> impl Strategy<Value = RunEvent> {
        prop_oneof![
            Just(RunEvent::Queue),
            Just(RunEvent::Claim),
            reason().prop_map(RunEvent::Record),
            any::<bool>().prop_map(RunEvent::Waiting),
            Just(RunEvent::Start),
            (status(), reason()).prop_map(|(s, r)| RunEvent::Finish(s, r)),
            reason().prop_map(RunEvent::Abandon),
            Just(RunEvent::Stop),
            Just(RunEvent::WorkerLost),
            Just(RunEvent::Expire),
        ]
    }

    /// One fire's runs as the catalogue keeps them: an event goes to one of them (or
    /// creates one); a LOST attempt gets its retry queued, as `queue_retries` does.
    #[derive(Debug, Default)]
    struct Fire {
        runs: Vec<(RunStatus, Option<RunReason>)>,
        stop_requested: Vec<bool>,
    }

    impl Fire {
        fn apply(&mut self, target: usize, event: &RunEvent, max_retries: usize) {
            let index = if self.runs.is_empty() {
                None
            } else {
                Some(target % (self.runs.len() + 1)).filter(|i| *i < self.runs.len())
            };
            let current = index.map(|i| self.runs[i].0);
            match step(current, event) {
                Step::To(to, reason) => {
                    assert!(
                        allowed(current, to, reason),
                        "{current:?} --{event:?}--> {to:?} {reason:?} is not in the machine"
                    );
                    if let Some(i) = index {
                        assert!(!self.runs[i].0.is_final(), "a final run moved: {event:?}");
                        self.runs[i] = (to, reason);
                    } else {
                        self.runs.push((to, reason));
                        self.stop_requested.push(false);
                    }
                    if to == RunStatus::Lost && self.runs.len() <= max_retries {
                        let queued = step(None, &RunEvent::Queue);
                        let Step::To(status, reason) = queued else {
                            panic!("a retry is queued: {queued:?}");
                        };
                        self.runs.push((status, reason));
                        self.stop_requested.push(false);
                    }
                }
                Step::StopRequested => {
                    let i = index.expect("a stop of a run");
                    assert_eq!(self.runs[i].0, RunStatus::Running);
                    self.stop_requested[i] = true;
                }
                Step::Ignore | Step::Refuse(_) => {}
            }
        }

        /// What the platform does once nobody else does anything: a queued run expires,
        /// a running run's worker ends (or ended) its session.
        fn settle(&mut self, max_retries: usize) {
            for _ in 0..=max_retries + 1 {
                for i in 0..self.runs.len() {
                    self.apply(i, &RunEvent::Expire, max_retries);
                    self.apply(i, &RunEvent::WorkerLost, max_retries);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn no_event_sequence_leaves_the_machine_and_every_run_ends_with_a_reason(
            events in prop::collection::vec((0usize..4, event()), 0..40),
            max_retries in 0usize..3,
        ) {
            let mut fire = Fire::default();
            for (target, event) in &events {
                fire.apply(*target, event, max_retries);
            }
            fire.settle(max_retries);
            for (status, reason) in &fire.runs {
                prop_assert!(status.is_final(), "{:?} after {:?}", fire.runs, events);
                prop_assert!(reason.is_some(), "{:?} after {:?}", fire.runs, events);
            }
        }

        #[test]
        fn every_step_from_any_status_is_a_transition_of_the_machine(
            from in prop::option::of(status()),
            event in event(),
        ) {
            if let Step::To(to, reason) = step(from, &event) {
                prop_assert!(allowed(from, to, reason), "{from:?} --{event:?}--> {to:?} {reason:?}");
                if let Some(from) = from {
                    prop_assert!(!from.is_final());
                }
                if to.is_final() {
                    prop_assert!(reason.is_some());
                }
            }
        }

        #[test]
        fn a_completed_outcome_is_final_with_a_reason_that_goes_with_it(
            status in status(),
            reason in prop::option::of(reason()),
            exit_code in prop::option::of(-1i32..3),
            signal in prop::option::of(1i32..16),
        ) {
            let outcome = Outcome {
                status, exit_code, signal, reason, error: None, finished_at: chrono::Utc::now(),
            };
            let done = complete(&outcome);
            prop_assert!(done.status.is_final());
            prop_assert!(allowed(Some(RunStatus::Running), done.status, done.reason));
        }
    }

    #[test]
    fn the_reasons_an_earlier_worker_leaves_out_are_filled_in() {
        let outcome = |status, exit_code, signal, reason| Outcome {
            status,
            exit_code,
            signal,
            reason,
            error: None,
            finished_at: chrono::Utc::now(),
        };
        let reason_of = |o: Outcome| complete(&o).reason.unwrap();
        use RunStatus as S;
        assert_eq!(
            reason_of(outcome(S::Failed, Some(3), None, None)),
            RunReason::Exit
        );
        assert_eq!(
            reason_of(outcome(S::Failed, None, Some(9), None)),
            RunReason::Signal
        );
        assert_eq!(
            reason_of(outcome(S::Failed, None, None, None)),
            RunReason::StartFailed
        );
        assert_eq!(
            reason_of(outcome(
                S::Failed,
                None,
                Some(9),
                Some(RunReason::OomKilled)
            )),
            RunReason::OomKilled
        );
        assert_eq!(
            reason_of(outcome(S::Stopped, None, None, None)),
            RunReason::UserStop
        );
        assert_eq!(
            reason_of(outcome(S::Lost, None, None, Some(RunReason::Fenced))),
            RunReason::Fenced
        );
        // A reason that does not go with the status gives way.
        assert_eq!(
            reason_of(outcome(
                S::Succeeded,
                Some(0),
                None,
                Some(RunReason::Fenced)
            )),
            RunReason::Exit
        );
    }

    #[test]
    fn a_user_stops_a_queued_run_at_once_and_a_running_one_through_its_worker() {
        assert_eq!(
            step(Some(RunStatus::Queued), &RunEvent::Stop),
            Step::To(RunStatus::Stopped, Some(RunReason::UserStop))
        );
        assert_eq!(
            step(Some(RunStatus::Running), &RunEvent::Stop),
            Step::StopRequested
        );
        assert!(matches!(
            step(Some(RunStatus::Failed), &RunEvent::Stop),
            Step::Refuse(_)
        ));
    }

    #[test]
    fn skip_reasons_are_read_from_the_workers_words() {
        assert_eq!(
            skip_reason_of(Some("overlap: the previous run is still going")),
            RunReason::OverlapSkip
        );
        assert_eq!(
            skip_reason_of(Some("misfire: the API could not be reached in time")),
            RunReason::Misfire
        );
        assert_eq!(
            skip_reason_of(Some(
                "not started: the worker shut down before its fire time"
            )),
            RunReason::Shutdown
        );
        assert_eq!(
            skip_reason_of(Some("not started: the task changed before its fire time")),
            RunReason::TaskChanged
        );
        assert_eq!(
            skip_reason_of(Some(
                "not started: the task left this worker before its fire time"
            )),
            RunReason::TaskMoved
        );
        assert_eq!(skip_reason_of(None), RunReason::Misfire);
    }
}
