//! Tasks: the versioned spec a worker runs, its policies, and the rules for valid input.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::limits::RunLimits;
use crate::schedule::{Schedule, ScheduleError};
use crate::{Error, Result};

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_DESCRIPTION_CHARS: usize = 2_000;
pub const MAX_COMMAND_BYTES: usize = 8_192;
pub const MAX_ENV_VARS: usize = 100;
pub const MAX_ENV_VALUE_BYTES: usize = 4_096;
pub const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3600;
pub const MAX_RETRIES: u32 = 20;
pub const MAX_NOTIFY_EMAILS: usize = 20;

/// What happens to a fire when the previous run of the task is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverlapPolicy {
    /// Record a SKIPPED run and leave the running one alone.
    #[default]
    Skip,
    Allow,
    /// Stop the running one, then start.
    Replace,
}

/// What happens to fires missed while no worker owned the task or the API was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MisfirePolicy {
    #[default]
    Skip,
    /// Run the latest missed fire once, if it is within the grace period.
    RunOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Active,
    Paused,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Active => "ACTIVE",
            TaskState::Paused => "PAUSED",
        }
    }
}

/// Everything that decides what a worker runs and when. A change to any field is a new
/// task version; name, description and state are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    pub schedule: String,
    pub timezone: String,
    pub command: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_seconds: Option<u32>,
    #[serde(default)]
    pub overlap_policy: OverlapPolicy,
    #[serde(default)]
    pub misfire_policy: MisfirePolicy,
    #[serde(default = "default_grace")]
    pub misfire_grace_seconds: u32,
    #[serde(default)]
    pub max_retries: u32,
    #[serde(default = "default_backoff")]
    pub retry_backoff_seconds: u32,
    pub package_sha256: Option<String>,
    pub active_from: Option<DateTime<Utc>>,
    pub active_until: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub notify_emails: Vec<String>,
    /// The task's own limits (unset ones come from its cluster's defaults).
    #[serde(default, skip_serializing_if = "RunLimits::is_empty")]
    pub limits: RunLimits,
}

fn default_grace() -> u32 {
    60
}

fn default_backoff() -> u32 {
    10
}

impl TaskSpec {
    /// A spec with the defaults a user gets when they give only schedule and command.
    pub fn new(schedule: impl Into<String>, command: impl Into<String>) -> Self {
        TaskSpec {
            schedule: schedule.into(),
            timezone: "UTC".into(),
            command: command.into(),
            env: BTreeMap::new(),
            timeout_seconds: None,
            overlap_policy: OverlapPolicy::default(),
            misfire_policy: MisfirePolicy::default(),
            misfire_grace_seconds: default_grace(),
            max_retries: 0,
            retry_backoff_seconds: default_backoff(),
            package_sha256: None,
            active_from: None,
            active_until: None,
            labels: Vec::new(),
            notify_emails: Vec::new(),
            limits: RunLimits::default(),
        }
    }

    /// Checks every field; the error names the input field (GraphQL spelling).
    /// The schedule, its timezone and active window, parsed.
    pub fn parse_schedule(&self) -> Result<Schedule> {
        Schedule::parse(
            &self.schedule,
            &self.timezone,
            self.active_from,
            self.active_until,
        )
        .map_err(|e| match e {
            ScheduleError::Timezone(_) => Error::bad_input("timezone", e),
            ScheduleError::Window => Error::bad_input("activeUntil", e),
            ScheduleError::Cron(_) => Error::bad_input("schedule", e),
        })
    }

    pub fn validate(&self) -> Result<Schedule> {
        let schedule = self.parse_schedule()?;
        if self.command.trim().is_empty() {
            return Err(Error::bad_input("command", "must not be empty"));
        }
        if self.command.len() > MAX_COMMAND_BYTES {
            return Err(Error::bad_input(
                "command",
                format!("longer than {MAX_COMMAND_BYTES} bytes"),
            ));
        }
        if self.command.contains('\0') {
            return Err(Error::bad_input("command", "must not contain NUL"));
        }
        validate_env(&self.env)?;
        if let Some(t) = self.timeout_seconds
            && (t == 0 || t > MAX_TIMEOUT_SECONDS)
        {
            return Err(Error::bad_input(
                "timeoutSeconds",
                format!("must be between 1 and {MAX_TIMEOUT_SECONDS}"),
            ));
        }
        if self.max_retries > MAX_RETRIES {
            return Err(Error::bad_input(
                "maxRetries",
                format!("must be at most {MAX_RETRIES}"),
            ));
        }
        if let Some(sha) = &self.package_sha256
            && !is_sha256_hex(sha)
        {
            return Err(Error::bad_input("package", "not a sha256 hex digest"));
        }
        if let Some(label) = self.labels.iter().find(|l| !valid_label(l)) {
            return Err(Error::bad_input(
                "labels",
                format!("bad label {label:?}: {LABEL_RULE}"),
            ));
        }
        validate_emails(&self.notify_emails)?;
        self.limits.validate()?;
        Ok(schedule)
    }
}

/// What a label (of a worker, or needed by a task) may be, said to whoever gave a bad one.
pub const LABEL_RULE: &str = "use 1 to 63 letters, digits, '-', '_' or '.'";

/// Whether `label` may name a worker label: the same rule on both sides, so a task never
/// needs a label no worker can carry.
pub fn valid_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > MAX_ENV_VARS {
        return Err(Error::bad_input(
            "env",
            format!("more than {MAX_ENV_VARS} variables"),
        ));
    }
    for (key, value) in env {
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(Error::bad_input(
                "env",
                format!("bad variable name {key:?}"),
            ));
        }
        if key.starts_with("CLOUDTASK_") {
            return Err(Error::bad_input("env", format!("{key} is reserved")));
        }
        if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Err(Error::bad_input("env", format!("bad value for {key}")));
        }
    }
    Ok(())
}

pub fn validate_emails(emails: &[String]) -> Result<()> {
    if emails.len() > MAX_NOTIFY_EMAILS {
        return Err(Error::bad_input(
            "notifyEmails",
            format!("more than {MAX_NOTIFY_EMAILS}"),
        ));
    }
    for email in emails {
        validate_email("notifyEmails", email)?;
    }
    Ok(())
}

/// A deliberately plain check: one `@` with something on both sides (`admin@localhost`
/// is a fine address on a single machine).
pub fn validate_email(field: &str, email: &str) -> Result<()> {
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && (domain.contains('.') || domain == "localhost")
                && !domain.contains('@')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::bad_input(
            field,
            format!("not an email address: {email:?}"),
        ))
    }
}

/// Names of tasks, clusters and tenants: 1 to 100 characters, no control characters.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    let count = name.chars().count();
    if name.trim().is_empty() {
        return Err(Error::bad_input(field, "must not be empty"));
    }
    if count > MAX_NAME_CHARS {
        return Err(Error::bad_input(
            field,
            format!("longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::bad_input(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub fn validate_description(description: &str) -> Result<()> {
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(Error::bad_input(
            "description",
            format!("longer than {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    Ok(())
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: Error) -> String {
        match err {
            Error::BadInput { field, .. } => field,
            other => panic!("expected BadInput, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let ok = TaskSpec::new("*/5 * * * *", "echo hi");
        assert!(ok.validate().is_ok());
        let cases: Vec<(TaskSpec, &str)> = vec![
            (
                TaskSpec {
                    schedule: "nope".into(),
                    ..ok.clone()
                },
                "schedule",
            ),
            (
                TaskSpec {
                    timezone: "Mars/Olympus".into(),
                    ..ok.clone()
                },
                "timezone",
            ),
            (
                TaskSpec {
                    command: "  ".into(),
                    ..ok.clone()
                },
                "command",
            ),
            (
                TaskSpec {
                    timeout_seconds: Some(0),
                    ..ok.clone()
                },
                "timeoutSeconds",
            ),
            (
                TaskSpec {
                    max_retries: 99,
                    ..ok.clone()
                },
                "maxRetries",
            ),
            (
                TaskSpec {
                    env: [("1BAD".to_string(), "x".to_string())].into(),
                    ..ok.clone()
                },
                "env",
            ),
            (
                TaskSpec {
                    notify_emails: vec!["nobody".into()],
                    ..ok.clone()
                },
                "notifyEmails",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(spec.validate().unwrap_err()), field);
        }
        assert_eq!(
            field_of(validate_name("name", &"x".repeat(101)).unwrap_err()),
            "name"
        );
        assert_eq!(field_of(validate_name("name", "").unwrap_err()), "name");
    }
}
