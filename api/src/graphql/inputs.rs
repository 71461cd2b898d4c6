//! Input objects of every resource, and how each becomes what the catalogue takes. Field
//! checks that need the domain's rules happen there (`TaskSpec::validate`, …).

use std::collections::BTreeMap;

use async_graphql::{ID, InputObject, MaybeUndefined, Upload};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::notifications::TenantNotifications;
use cloudtask_catalogue::{NewTask, RunFilter, TaskEdit, TaskFilter};
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_core::{Error, Result};

use super::args::{parse_id, parse_optional_id};
use super::limits::RunLimitsInput;
use super::members::RoleGql;
use super::runs::RunStatusGql;
use super::tasks::{MisfirePolicyGql, OverlapPolicyGql, TaskStateGql};

#[derive(InputObject)]
pub struct CreateTenantInput {
    pub name: String,
    /// The first owner. An existing account is reused; a new one needs `ownerPassword`.
    pub owner_email: String,
    pub owner_password: Option<String>,
}

#[derive(InputObject)]
pub struct AddMemberInput {
    pub email: String,
    pub role: RoleGql,
    /// Required when no account exists for the email yet.
    pub password: Option<String>,
}

/// Who hears about the tenant's failures besides each task's `notifyEmails`, and where
/// events are POSTed.
#[derive(InputObject)]
pub struct NotificationSettingsInput {
    pub notify_emails: Vec<String>,
    /// An http(s) URL that receives every event as signed JSON; null turns it off.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key of the `X-CloudTask-Signature` header (at least 16
    /// characters); omitted: the stored one stays.
    pub webhook_secret: Option<String>,
}

impl From<NotificationSettingsInput> for TenantNotifications {
    fn from(input: NotificationSettingsInput) -> Self {
        TenantNotifications {
            emails: input.notify_emails,
            webhook_url: input.webhook_url,
            webhook_secret: input.webhook_secret,
        }
    }
}

#[derive(InputObject, Clone)]
pub struct EnvVarInput {
    pub name: String,
    pub value: String,
}

#[derive(InputObject)]
pub struct CreateTaskInput {
    pub cluster_id: ID,
    pub name: String,
    #[graphql(default)]
    pub description: String,
    pub schedule: String,
    /// IANA timezone; UTC when omitted.
    pub timezone: Option<String>,
    pub command: String,
    pub env: Option<Vec<EnvVarInput>>,
    pub timeout_seconds: Option<u32>,
    pub overlap_policy: Option<OverlapPolicyGql>,
    pub misfire_policy: Option<MisfirePolicyGql>,
    pub misfire_grace_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_backoff_seconds: Option<u32>,
    pub active_from: Option<DateTime<Utc>>,
    pub active_until: Option<DateTime<Utc>>,
    pub labels: Option<Vec<String>>,
    pub notify_emails: Option<Vec<String>>,
    /// What each run may use; unset limits come from the cluster's defaults.
    pub limits: Option<RunLimitsInput>,
    /// Create the task paused.
    #[graphql(default)]
    pub paused: bool,
    /// The program: a zip or tar.gz archive (GraphQL multipart request).
    pub package: Option<Upload>,
    /// Or a package already uploaded to this tenant, by hash.
    pub package_sha256: Option<String>,
}

impl CreateTaskInput {
    /// The task to create, checked, and the upload to read for it (if any): bad fields
    /// are refused before a possibly large upload is read.
    pub fn parse(self) -> Result<(NewTask, Option<Upload>)> {
        let spec = TaskSpec {
            schedule: self.schedule,
            timezone: self.timezone.unwrap_or_else(|| "UTC".into()),
            command: self.command,
            env: env_map(self.env.unwrap_or_default())?,
            timeout_seconds: self.timeout_seconds,
            overlap_policy: self.overlap_policy.map(Into::into).unwrap_or_default(),
            misfire_policy: self.misfire_policy.map(Into::into).unwrap_or_default(),
            misfire_grace_seconds: self.misfire_grace_seconds.unwrap_or(60),
            max_retries: self.max_retries.unwrap_or(0),
            retry_backoff_seconds: self.retry_backoff_seconds.unwrap_or(10),
            package_sha256: self.package_sha256,
            active_from: self.active_from,
            active_until: self.active_until,
            labels: self.labels.unwrap_or_default(),
            notify_emails: self.notify_emails.unwrap_or_default(),
            limits: self.limits.map(Into::into).unwrap_or_default(),
        };
        let new = NewTask {
            cluster_id: parse_id("clusterId", &self.cluster_id)?,
            name: self.name,
            description: self.description,
            state: if self.paused {
                TaskState::Paused
            } else {
                TaskState::Active
            },
            spec,
        };
        new.spec.validate()?;
        cloudtask_core::task::validate_name("name", &new.name)?;
        Ok((new, self.package))
    }
}

#[derive(InputObject)]
pub struct UpdateTaskInput {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub command: Option<String>,
    /// Replaces the whole environment.
    pub env: Option<Vec<EnvVarInput>>,
    /// `null` removes the timeout.
    pub timeout_seconds: MaybeUndefined<u32>,
    pub overlap_policy: Option<OverlapPolicyGql>,
    pub misfire_policy: Option<MisfirePolicyGql>,
    pub misfire_grace_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_backoff_seconds: Option<u32>,
    pub active_from: MaybeUndefined<DateTime<Utc>>,
    pub active_until: MaybeUndefined<DateTime<Utc>>,
    pub labels: Option<Vec<String>>,
    pub notify_emails: Option<Vec<String>>,
    /// Replaces the task's limits (fields omitted or null: the cluster's defaults).
    pub limits: Option<RunLimitsInput>,
    /// Switch to another package of this tenant (e.g. back to an earlier one).
    pub package_sha256: Option<String>,
}

impl UpdateTaskInput {
    /// Writes the given fields over the task; what is omitted stays.
    pub fn apply(self, edit: &mut TaskEdit) -> Result<()> {
        merge(&mut edit.name, self.name);
        merge(&mut edit.description, self.description);
        let spec = &mut edit.spec;
        merge(&mut spec.schedule, self.schedule);
        merge(&mut spec.timezone, self.timezone);
        merge(&mut spec.command, self.command);
        merge(&mut spec.env, self.env.map(env_map).transpose()?);
        merge_nullable(&mut spec.timeout_seconds, self.timeout_seconds);
        merge(
            &mut spec.overlap_policy,
            self.overlap_policy.map(Into::into),
        );
        merge(
            &mut spec.misfire_policy,
            self.misfire_policy.map(Into::into),
        );
        merge(&mut spec.misfire_grace_seconds, self.misfire_grace_seconds);
        merge(&mut spec.max_retries, self.max_retries);
        merge(&mut spec.retry_backoff_seconds, self.retry_backoff_seconds);
        merge_nullable(&mut spec.active_from, self.active_from);
        merge_nullable(&mut spec.active_until, self.active_until);
        merge(&mut spec.labels, self.labels);
        merge(&mut spec.notify_emails, self.notify_emails);
        merge(&mut spec.limits, self.limits.map(Into::into));
        if let Some(sha) = self.package_sha256 {
            spec.package_sha256 = Some(sha);
        }
        Ok(())
    }
}

fn env_map(env: Vec<EnvVarInput>) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for var in env {
        if map.insert(var.name.clone(), var.value).is_some() {
            return Err(Error::bad_input("env", format!("{} given twice", var.name)));
        }
    }
    Ok(map)
}

fn merge<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn merge_nullable<T>(target: &mut Option<T>, value: MaybeUndefined<T>) {
    match value {
        MaybeUndefined::Undefined => {}
        MaybeUndefined::Null => *target = None,
        MaybeUndefined::Value(v) => *target = Some(v),
    }
}

/// Which tasks `tasks` lists: every field given must match.
#[derive(InputObject, Default)]
#[graphql(name = "TaskFilter")]
pub struct TaskFilterInput {
    pub cluster_id: Option<ID>,
    pub state: Option<TaskStateGql>,
    /// Case-sensitive substring of the name.
    pub name_contains: Option<String>,
}

impl TaskFilterInput {
    pub fn parse(self) -> Result<TaskFilter> {
        Ok(TaskFilter {
            cluster_id: parse_optional_id("filter.clusterId", self.cluster_id.as_ref())?,
            state: self.state.map(Into::into),
            name_contains: self.name_contains,
        })
    }
}

/// Which runs `runs` lists: every field given must match.
#[derive(InputObject, Default)]
#[graphql(name = "RunFilter")]
pub struct RunFilterInput {
    pub task_id: Option<ID>,
    pub status: Option<RunStatusGql>,
}

impl RunFilterInput {
    pub fn parse(self) -> Result<RunFilter> {
        Ok(RunFilter {
            task_id: parse_optional_id("filter.taskId", self.task_id.as_ref())?,
            status: self.status.map(Into::into),
        })
    }
}
