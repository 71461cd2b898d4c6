//! Runs: what one fire of a task became, its log lines, and the wire format workers use to
//! claim fires and report what happened (DESIGN §4–§6).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{RunId, TaskId};

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { $($variant),+ }

        impl $name {
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

/// A worker asks to start one fire: (task, scheduled time, attempt) is claimed once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub task_id: TaskId,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    /// The task version the worker's spec has: a claim on a stale spec is refused.
    pub task_version: u32,
    pub worker: String,
    pub trigger: RunTrigger,
    /// `Running` to start it; `Skipped` to record a fire not run (overlap, misfire).
    pub status: RunStatus,
    /// Why a skipped fire was skipped.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claimed {
    pub run_id: RunId,
}

/// Claims sent in one request: a worker claims the fires due together at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimBatch {
    pub claims: Vec<Claim>,
}

/// Most claims one request may carry.
pub const MAX_CLAIM_BATCH: usize = 1_000;

/// The answer to one claim of a batch: its run, or why it was refused (final: the fire
/// is claimed already, the task is paused, moved or changed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ClaimAnswer {
    Claimed { run_id: RunId },
    Refused { code: String, message: String },
}

/// The answers to a batch, in the order of its claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimAnswers {
    pub answers: Vec<ClaimAnswer>,
}

/// A queued run (manual, or the retry of a lost fire) as its worker starts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub run_id: RunId,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    pub trigger: RunTrigger,
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

/// One thing a worker reports about a run: when its process started (a fire is claimed
/// ahead of its time), that a claimed fire was not started, a batch of its log lines, or
/// how it ended. Reports of one run are delivered in the order they were
/// made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Report {
    Started {
        run: RunId,
        at: DateTime<Utc>,
    },
    /// A fire claimed ahead of its time was not started. The API decides what it was: not
    /// due after all (the task was paused or deleted before it, or edited since the
    /// claim: the record goes), or a fire not run (SKIPPED, with `reason`).
    Abandon {
        run: RunId,
        reason: String,
    },
    Logs {
        run: RunId,
        lines: Vec<LogLine>,
    },
    Finish {
        run: RunId,
        outcome: Outcome,
    },
}

impl Report {
    pub fn run(&self) -> RunId {
        match self {
            Report::Started { run, .. }
            | Report::Abandon { run, .. }
            | Report::Logs { run, .. }
            | Report::Finish { run, .. } => *run,
        }
    }
}

/// Reports delivered in one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportBatch {
    pub reports: Vec<Report>,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text_and_json() {
        for status in [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::TimedOut,
            RunStatus::Stopped,
            RunStatus::Lost,
            RunStatus::Skipped,
        ] {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(RunStatus::parse("running"), None);
        assert!(!RunStatus::Running.is_final() && RunStatus::Lost.is_final());
    }
}
