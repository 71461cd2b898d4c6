//! The worker protocol: the bodies of the API's `/worker/*` requests and answers, defined
//! once for both ends (the API's endpoints and the worker's client). Field names are the
//! JSON on the wire: renaming one breaks workers and APIs of other versions.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, RunId, TaskId, TenantId, WorkerId};
use crate::run::{LogLine, Outcome, RunStatus, RunTrigger};

/// `POST /worker/join`: the cluster's join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
}

/// What the API hands a worker that presented a valid join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinedCluster {
    /// Bearer credential for the worker endpoints, valid for this cluster only.
    pub credential: String,
    pub expires_at: DateTime<Utc>,
    pub tenant_id: TenantId,
    pub cluster_id: ClusterId,
    /// The worker's own ZooKeeper identity, when the tree has ACLs (absent on an open
    /// tree, and from APIs of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zookeeper: Option<ZooKeeperIdentity>,
}

/// A cluster's workers' ZooKeeper digest identity: it reaches that cluster's part of the
/// tree only. Replaced when the cluster's join token is rotated.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperIdentity {
    pub user: String,
    pub password: String,
    /// The digest id of the tree's owner, which the nodes a worker creates name as
    /// their owner (`user:base64(sha1(user:password))`; not a secret).
    pub owner_id: String,
}

impl fmt::Debug for ZooKeeperIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZooKeeperIdentity")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A task's environment: kept out of ZooKeeper (its values are the tenant's secrets),
/// handed to the worker of a fire with its claim or start.
pub type TaskEnv = BTreeMap<String, String>;

impl fmt::Debug for JoinedCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinedCluster")
            .field("credential", &"<redacted>")
            .field("cluster_id", &self.cluster_id)
            .field("tenant_id", &self.tenant_id)
            .field("expires_at", &self.expires_at)
            .field("zookeeper", &self.zookeeper)
            .finish()
    }
}

/// A refused worker request: the domain error's code and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: String,
    pub error: String,
}

/// `GET /worker/tasks/{task}/cursor`: where a worker taking a task over starts accounting
/// for missed fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FireCursor {
    pub since: DateTime<Utc>,
}

/// `POST /worker/runs/{run}/start`: the worker starting a queued run it was handed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    pub worker: WorkerId,
}

/// `POST /worker/claims`: a worker asks to start one fire; (task, scheduled time, attempt)
/// is claimed once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub task_id: TaskId,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    /// The task version the worker's spec has: a claim on a stale spec is refused.
    pub task_version: u32,
    pub worker: WorkerId,
    pub trigger: RunTrigger,
    /// `Running` to start it; `Skipped` to record a fire not run (overlap, misfire).
    pub status: RunStatus,
    /// Why a skipped fire was skipped.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to one claim sent alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claimed {
    pub run_id: RunId,
    /// The task's environment at the claimed version.
    #[serde(default)]
    pub env: TaskEnv,
}

/// `POST /worker/claims/batch`: a worker claims the fires due together in one request.
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
    Claimed {
        run_id: RunId,
        /// The task's environment at the claimed version.
        #[serde(default)]
        env: TaskEnv,
    },
    Refused {
        code: String,
        message: String,
    },
}

/// The answers to a batch, in the order of its claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimAnswers {
    pub answers: Vec<ClaimAnswer>,
}

/// The answer to a start: the queued run (manual, or the retry of a lost fire) as its
/// worker starts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub run_id: RunId,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    pub trigger: RunTrigger,
    /// The task's environment (its current version).
    #[serde(default)]
    pub env: TaskEnv,
}

/// One thing a worker reports about a run: when its process started (a fire is claimed
/// ahead of its time), that a claimed fire was not started, a batch of its log lines, or
/// how it ended. Reports of one run are delivered in the order they were made.
///
/// On the wire an object tagged by `kind` (`{"kind":"logs","run":…,"lines":[…]}`). It is
/// read by [`Report`]'s own `Deserialize`, field by field in any order, straight into
/// its values: serde's derive for a tagged enum would first copy the whole object (every
/// line of a batch) into a buffer of its own, a second parse of every log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

impl<'de> Deserialize<'de> for Report {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Report, D::Error> {
        deserializer.deserialize_map(ReportVisitor)
    }
}

/// The kinds of [`Report`], as tagged on the wire.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum ReportKind {
    Started,
    Abandon,
    Logs,
    Finish,
}

/// The fields of every kind of [`Report`]: a field has one type whatever the kind, so each
/// is read as it comes, before or after the tag. Fields a kind does not have are ignored,
/// as serde's derive does.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum ReportField {
    Kind,
    Run,
    At,
    Reason,
    Lines,
    Outcome,
    #[serde(other)]
    Other,
}

struct ReportVisitor;

impl<'de> serde::de::Visitor<'de> for ReportVisitor {
    type Value = Report;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a run report: an object with a kind")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Report, A::Error> {
        use serde::de::Error;
        fn once<'de, A: serde::de::MapAccess<'de>, T: Deserialize<'de>>(
            map: &mut A,
            slot: &mut Option<T>,
            name: &'static str,
        ) -> Result<(), A::Error> {
            if slot.is_some() {
                return Err(A::Error::duplicate_field(name));
            }
            *slot = Some(map.next_value()?);
            Ok(())
        }
        let (mut kind, mut run, mut at, mut reason, mut lines, mut outcome) =
            (None, None, None, None, None, None);
        while let Some(field) = map.next_key::<ReportField>()? {
            match field {
                ReportField::Kind => once(&mut map, &mut kind, "kind")?,
                ReportField::Run => once(&mut map, &mut run, "run")?,
                ReportField::At => once(&mut map, &mut at, "at")?,
                ReportField::Reason => once(&mut map, &mut reason, "reason")?,
                ReportField::Lines => once(&mut map, &mut lines, "lines")?,
                ReportField::Outcome => once(&mut map, &mut outcome, "outcome")?,
                ReportField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let run = run.ok_or_else(|| A::Error::missing_field("run"))?;
        Ok(match kind.ok_or_else(|| A::Error::missing_field("kind"))? {
            ReportKind::Started => Report::Started {
                run,
                at: at.ok_or_else(|| A::Error::missing_field("at"))?,
            },
            ReportKind::Abandon => Report::Abandon {
                run,
                reason: reason.ok_or_else(|| A::Error::missing_field("reason"))?,
            },
            ReportKind::Logs => Report::Logs {
                run,
                lines: lines.ok_or_else(|| A::Error::missing_field("lines"))?,
            },
            ReportKind::Finish => Report::Finish {
                run,
                outcome: outcome.ok_or_else(|| A::Error::missing_field("outcome"))?,
            },
        })
    }
}

/// `POST /worker/reports`: reports delivered in one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportBatch {
    pub reports: Vec<Report>,
}

/// The largest body `POST /worker/reports` takes (the API refuses more with 413); workers
/// size their batches to it.
pub const MAX_REPORT_BODY_BYTES: usize = 2 << 20;

/// Most log lines and outcomes one batch may carry.
pub const MAX_REPORT_LINES: usize = 5_000;

/// The longest output line (in bytes, as printed) a worker may be set to keep whole:
/// escaped and in JSON, such a line takes at most 5 bytes per byte, far below
/// [`MAX_REPORT_BODY_BYTES`].
pub const MAX_LINE_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The bodies as both ends built them by hand before this module: same bytes.
    #[test]
    fn bodies_keep_their_wire_form() {
        let tenant = TenantId::new();
        let cluster = ClusterId::new();
        let at: DateTime<Utc> = "2030-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(
            text(&JoinRequest { token: "t".into() }),
            json!({ "token": "t" }).to_string()
        );
        assert_eq!(
            text(&StartRequest {
                worker: "w".parse().unwrap()
            }),
            json!({ "worker": "w" }).to_string()
        );
        assert_eq!(
            text(&ErrorBody {
                code: "CONFLICT".into(),
                error: "no".into()
            }),
            json!({ "error": "no", "code": "CONFLICT" }).to_string()
        );
        assert_eq!(
            text(&FireCursor { since: at }),
            r#"{"since":"2030-01-02T03:04:05Z"}"#
        );
        assert_eq!(
            text(&JoinedCluster {
                credential: "c".into(),
                expires_at: at,
                tenant_id: tenant,
                cluster_id: cluster,
                zookeeper: None,
            }),
            format!(
                r#"{{"credential":"c","expiresAt":"2030-01-02T03:04:05Z","tenantId":"{tenant}","clusterId":"{cluster}"}}"#
            )
        );
    }

    /// Reports read back as serde's derive for a tagged enum wrote and read them: the tag
    /// anywhere, unknown fields ignored, a missing or repeated field refused.
    #[test]
    fn reports_read_in_any_field_order_and_as_written() {
        let run = RunId::new();
        let at: DateTime<Utc> = "2030-01-02T03:04:05Z".parse().unwrap();
        let line = LogLine {
            offset: 7,
            stream: crate::run::LogStream::Stderr,
            at,
            text: "a \"quoted\" line".into(),
        };
        let outcome = Outcome {
            status: RunStatus::Failed,
            exit_code: Some(3),
            signal: None,
            error: Some("exit 3".into()),
            finished_at: at,
            reason: None,
        };
        let reports = vec![
            Report::Started { run, at },
            Report::Abandon {
                run,
                reason: "paused".into(),
            },
            Report::Logs {
                run,
                lines: vec![line.clone(), line],
            },
            Report::Finish { run, outcome },
        ];
        let written = text(&ReportBatch {
            reports: reports.clone(),
        });
        assert!(written.contains(r#"{"kind":"logs","run":""#), "{written}");
        let read: ReportBatch = serde_json::from_str(&written).unwrap();
        assert_eq!(read.reports, reports);

        let moved = json!({ "run": run, "at": at, "extra": [1, 2], "kind": "started" });
        assert_eq!(
            serde_json::from_value::<Report>(moved).unwrap(),
            Report::Started { run, at }
        );
        for bad in [
            json!({ "kind": "started", "run": run }),
            json!({ "kind": "started", "at": at }),
            json!({ "run": run, "at": at }),
            json!({ "kind": "nothing", "run": run, "at": at }),
        ] {
            assert!(
                serde_json::from_value::<Report>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let twice = format!(r#"{{"kind":"logs","run":"{run}","lines":[],"lines":[]}}"#);
        assert!(serde_json::from_str::<Report>(&twice).is_err());
    }

    #[test]
    fn an_error_body_without_a_code_still_reads() {
        let body: ErrorBody = serde_json::from_str(r#"{"error":"starting"}"#).unwrap();
        assert_eq!(body.error, "starting");
    }

    fn text(body: &impl Serialize) -> String {
        serde_json::to_string(body).unwrap()
    }
}
