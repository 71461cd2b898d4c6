//! What the catalogue hands out: plain records with typed ids, converted from entities
//! by `From` impls. No GraphQL, no SQL.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId, UserId};
use cloudtask_core::roles::Role;
use cloudtask_core::run::{LogLine, LogStream, RunStatus, RunTrigger};
use cloudtask_core::task::{TaskSpec, TaskState};

use crate::entities;

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub platform_admin: bool,
    pub created_at: DateTime<Utc>,
}

/// A user with the password hash, for login only.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub user: User,
    pub tenant_id: TenantId,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// One of a user's tenants and their role in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub tenant: Tenant,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub id: ClusterId,
    pub tenant_id: TenantId,
    pub name: String,
    pub token_rotated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub tenant_id: TenantId,
    pub cluster_id: ClusterId,
    pub name: String,
    pub description: String,
    pub state: TaskState,
    pub version: u32,
    pub spec: TaskSpec,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskVersion {
    pub task_id: TaskId,
    pub version: u32,
    pub spec: TaskSpec,
    pub created_by: Option<UserId>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    pub sha256: String,
    pub format: String,
    pub size_bytes: u64,
    pub unpacked_bytes: u64,
    pub entries: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: uuid::Uuid,
    pub tenant_id: Option<TenantId>,
    pub actor_id: Option<UserId>,
    pub actor: String,
    pub operation: String,
    pub object_type: String,
    pub object_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<entities::tenant::Model> for Tenant {
    fn from(m: entities::tenant::Model) -> Self {
        Tenant {
            id: m.id.into(),
            name: m.name,
            created_at: m.created_at,
        }
    }
}

impl From<entities::user::Model> for User {
    fn from(m: entities::user::Model) -> Self {
        User {
            id: m.id.into(),
            email: m.email,
            platform_admin: m.platform_admin,
            created_at: m.created_at,
        }
    }
}

impl From<entities::cluster::Model> for Cluster {
    fn from(m: entities::cluster::Model) -> Self {
        Cluster {
            id: m.id.into(),
            tenant_id: m.tenant_id.into(),
            name: m.name,
            token_rotated_at: m.token_rotated_at,
            created_at: m.created_at,
        }
    }
}

impl From<entities::package::Model> for PackageInfo {
    fn from(m: entities::package::Model) -> Self {
        PackageInfo {
            sha256: m.sha256,
            format: m.format,
            size_bytes: m.size_bytes as u64,
            unpacked_bytes: m.unpacked_bytes as u64,
            entries: m.entries as u64,
            created_at: m.created_at,
        }
    }
}

impl From<entities::audit::Model> for AuditEntry {
    fn from(m: entities::audit::Model) -> Self {
        AuditEntry {
            id: m.id,
            tenant_id: m.tenant_id.map(Into::into),
            actor_id: m.actor_id.map(Into::into),
            actor: m.actor,
            operation: m.operation,
            object_type: m.object_type,
            object_id: m.object_id,
            created_at: m.created_at,
        }
    }
}

impl TryFrom<entities::task::Model> for Task {
    type Error = cloudtask_core::Error;

    fn try_from(m: entities::task::Model) -> Result<Self, Self::Error> {
        Ok(Task {
            id: m.id.into(),
            tenant_id: m.tenant_id.into(),
            cluster_id: m.cluster_id.into(),
            name: m.name,
            description: m.description,
            state: if m.state == TaskState::Paused.as_str() {
                TaskState::Paused
            } else {
                TaskState::Active
            },
            version: m.version as u32,
            spec: crate::decode_spec(m.spec)?,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

impl TryFrom<entities::task_version::Model> for TaskVersion {
    type Error = cloudtask_core::Error;

    fn try_from(m: entities::task_version::Model) -> Result<Self, Self::Error> {
        Ok(TaskVersion {
            task_id: m.task_id.into(),
            version: m.version as u32,
            spec: crate::decode_spec(m.spec)?,
            created_by: m.created_by.map(Into::into),
            created_at: m.created_at,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub tenant_id: TenantId,
    pub task_id: TaskId,
    pub cluster_id: ClusterId,
    pub task_version: u32,
    pub trigger: RunTrigger,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    pub status: RunStatus,
    pub worker: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<entities::run::Model> for Run {
    type Error = cloudtask_core::Error;

    fn try_from(m: entities::run::Model) -> Result<Self, Self::Error> {
        let bad = |what: &str, value: &str| {
            cloudtask_core::Error::internal(format!("stored run {}: bad {what} {value:?}", m.id))
        };
        Ok(Run {
            id: m.id.into(),
            tenant_id: m.tenant_id.into(),
            task_id: m.task_id.into(),
            cluster_id: m.cluster_id.into(),
            task_version: m.task_version as u32,
            trigger: RunTrigger::parse(&m.trigger).ok_or_else(|| bad("trigger", &m.trigger))?,
            scheduled_at: m.scheduled_at,
            attempt: m.attempt as u32,
            status: RunStatus::parse(&m.status).ok_or_else(|| bad("status", &m.status))?,
            worker: m.worker_id,
            started_at: m.started_at,
            finished_at: m.finished_at,
            exit_code: m.exit_code,
            signal: m.signal,
            error: m.error,
            created_at: m.created_at,
        })
    }
}

impl TryFrom<entities::run_log_line::Model> for LogLine {
    type Error = cloudtask_core::Error;

    fn try_from(m: entities::run_log_line::Model) -> Result<Self, Self::Error> {
        Ok(LogLine {
            offset: m.offset as u64,
            stream: LogStream::parse(&m.stream).ok_or_else(|| {
                cloudtask_core::Error::internal(format!("stored log stream {:?}", m.stream))
            })?,
            at: m.at,
            text: m.line,
        })
    }
}
