//! Runs: what one fire of a task became (status, trigger, outcome) and its log lines. The
//! requests workers send about runs are in [`crate::protocol`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(
    /// Where a run stands. Every status but `Queued` and `Running` is final.
    RunStatus {
        Queued => "QUEUED",
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        TimedOut => "TIMED_OUT",
        Stopped => "STOPPED",
        Lost => "LOST",
        Skipped => "SKIPPED",
    }
);

impl RunStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

text_enum!(
    /// What started a run.
    RunTrigger {
        Schedule => "SCHEDULE",
        Manual => "MANUAL",
        Retry => "RETRY",
    }
);

text_enum!(
    /// Where a log line came from: the program's two streams, or the worker itself.
    LogStream {
        Stdout => "STDOUT",
        Stderr => "STDERR",
        System => "SYSTEM",
    }
);

text_enum!(
    /// Why a run stands where it does: on every run that has ended, and on a queued run
    /// nobody can take yet. The run's state machine (`cloudtask_catalogue::runs::machine`)
    /// says which reasons go with which status.
    RunReason {
        // How the program ended.
        Exit => "EXIT",
        Signal => "SIGNAL",
        Timeout => "TIMEOUT",
        StartFailed => "START_FAILED",
        // The limits of the task (containment).
        OomKilled => "OOM_KILLED",
        PidsLimit => "PIDS_LIMIT",
        OutputLimit => "OUTPUT_LIMIT",
        // A person, or the task's own policy.
        UserStop => "USER_STOP",
        TaskPaused => "TASK_PAUSED",
        Replaced => "REPLACED",
        OverlapSkip => "OVERLAP_SKIP",
        Misfire => "MISFIRE",
        TaskChanged => "TASK_CHANGED",
        // The platform.
        WorkerLost => "WORKER_LOST",
        Fenced => "FENCED",
        Shutdown => "SHUTDOWN",
        TaskMoved => "TASK_MOVED",
        QueueExpired => "QUEUE_EXPIRED",
        WaitingForWorker => "WAITING_FOR_WORKER",
    }
);

impl RunReason {
    /// A limit of the task's containment.
    pub fn is_limit(self) -> bool {
        matches!(
            self,
            RunReason::OomKilled | RunReason::PidsLimit | RunReason::OutputLimit
        )
    }

    /// The platform ended the run (not the program, a person or the task's policy): the
    /// run is LOST and the task's retry policy applies.
    pub fn is_platform(self) -> bool {
        matches!(
            self,
            RunReason::WorkerLost | RunReason::Fenced | RunReason::Shutdown | RunReason::TaskMoved
        )
    }

    /// What the reason means, in a sentence (when the run carries no message of its own).
    pub fn describe(self) -> &'static str {
        match self {
            RunReason::Exit => "the program exited",
            RunReason::Signal => "the program was killed by a signal",
            RunReason::Timeout => "the run took longer than the task's timeout",
            RunReason::StartFailed => "the program could not be started",
            RunReason::OomKilled => "the run hit its memory limit",
            RunReason::PidsLimit => "the run hit its process limit",
            RunReason::OutputLimit => "the run hit its output limit",
            RunReason::UserStop => "a user stopped the run",
            RunReason::TaskPaused => "a user paused the task while the run was going",
            RunReason::Replaced => "a later fire replaced it (overlap policy REPLACE)",
            RunReason::OverlapSkip => "the previous run was still going (overlap policy SKIP)",
            RunReason::Misfire => "the fire could not be run on time",
            RunReason::TaskChanged => "the task changed before the fire time",
            RunReason::WorkerLost => "the worker's session ended while the run was going",
            RunReason::Fenced => "the worker lost its coordination session and stopped its runs",
            RunReason::Shutdown => "the worker shut down while the run was going",
            RunReason::TaskMoved => "the task left the worker while the run was going",
            RunReason::QueueExpired => "no worker took the queued run in time",
            RunReason::WaitingForWorker => "no live worker can take the task's runs yet",
        }
    }
}

/// The words a worker gives for a fire it does not run (`Claim::reason` of a SKIPPED
/// claim, `Report::Abandon`): both ends use these, and the API reads the run's reason
/// back from them ([`RunReason::of_not_run`]). Misfires say `misfire: …` and why.
pub mod not_run {
    pub const OVERLAP: &str = "overlap: the previous run is still going";
    pub const TASK_MOVED: &str = "not started: the task left this worker before its fire time";
    pub const TASK_CHANGED: &str = "not started: the task changed before its fire time";
    pub const SHUTDOWN: &str = "not started: the worker shut down before its fire time";
}

impl RunReason {
    /// The reason of a fire not run, from the worker's words (see [`not_run`]); words it
    /// does not know (an earlier worker's) read as MISFIRE.
    pub fn of_not_run(text: Option<&str>) -> RunReason {
        match text.unwrap_or_default() {
            not_run::TASK_MOVED => RunReason::TaskMoved,
            not_run::TASK_CHANGED => RunReason::TaskChanged,
            not_run::SHUTDOWN => RunReason::Shutdown,
            text if text.starts_with("overlap:") => RunReason::OverlapSkip,
            _ => RunReason::Misfire,
        }
    }
}

/// One line of a run's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// 0, 1, 2… per run: the position of the line, and the key that makes ingest
    /// idempotent.
    pub offset: u64,
    pub stream: LogStream,
    pub at: DateTime<Utc>,
    pub text: String,
}

/// How a run ended, as its worker saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub finished_at: DateTime<Utc>,
    /// Why the run ended so (a limit, a stop's cause, how the program ended). Workers of
    /// an earlier version send only limits; the catalogue fills in the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RunReason>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text_and_json() {
        for &status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(RunStatus::parse("running"), None);
        assert!(!RunStatus::Running.is_final() && RunStatus::Lost.is_final());
    }
}
