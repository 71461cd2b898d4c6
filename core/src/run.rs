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
    /// Why a run ended as it did, when its status alone does not say: so far, the limit
    /// that ended a FAILED run (more reasons may come for other statuses).
    RunReason {
        OomKilled => "OOM_KILLED",
        PidsLimit => "PIDS_LIMIT",
        OutputLimit => "OUTPUT_LIMIT",
    }
);

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
    /// The limit that ended the run, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RunReason>,
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
