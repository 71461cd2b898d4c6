//! GraphQL object types. Each wraps a catalogue record; no GraphQL derive touches an
//! entity, and resolvers that need more data go through the caller's tenant handle.

use async_graphql::connection::{Connection, Edge};
use async_graphql::{
    ComplexObject, Context, Enum, ID, MergedObject, Object, OutputType, SimpleObject,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use cloudtask_catalogue::{
    AuditEntry, Cluster, Member, Membership, PackageInfo, Page, PageRequest, Run, RunFilter, Task,
    TaskFilter, TaskVersion, Tenant, User,
};
use cloudtask_core::run::LogLine;
use cloudtask_core::task::TaskSpec;
use cloudtask_core::{Error, Result};
use uuid::Uuid;

use super::{identity, tenant};
use crate::error::ApiResult;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "Role", remote = "cloudtask_core::roles::Role")]
pub enum RoleGql {
    Owner,
    Admin,
    Operator,
    Viewer,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "TaskState", remote = "cloudtask_core::task::TaskState")]
pub enum TaskStateGql {
    Active,
    Paused,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "OverlapPolicy", remote = "cloudtask_core::task::OverlapPolicy")]
pub enum OverlapPolicyGql {
    Skip,
    Allow,
    Replace,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "MisfirePolicy", remote = "cloudtask_core::task::MisfirePolicy")]
pub enum MisfirePolicyGql {
    Skip,
    RunOnce,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunStatus", remote = "cloudtask_core::run::RunStatus")]
pub enum RunStatusGql {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Stopped,
    Lost,
    Skipped,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunTrigger", remote = "cloudtask_core::run::RunTrigger")]
pub enum RunTriggerGql {
    Schedule,
    Manual,
    Retry,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "LogStream", remote = "cloudtask_core::run::LogStream")]
pub enum LogStreamGql {
    Stdout,
    Stderr,
    System,
}

// ---- cursors and pages ------------------------------------------------------------------

const CURSOR_PREFIX: &str = "c1:";

pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{id}"))
}

fn decode_cursor(cursor: &str) -> Result<Uuid> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            text.strip_prefix(CURSOR_PREFIX)
                .and_then(|id| Uuid::parse_str(id).ok())
        })
        .ok_or_else(|| Error::bad_input("after", "not a cursor from this API"))
}

pub const DEFAULT_PAGE: i32 = 50;

pub fn page_request(first: Option<i32>, after: Option<String>) -> Result<PageRequest> {
    let first = first.unwrap_or(DEFAULT_PAGE);
    if !(0..=cloudtask_catalogue::MAX_PAGE as i32).contains(&first) {
        return Err(Error::bad_input(
            "first",
            format!("must be between 0 and {}", cloudtask_catalogue::MAX_PAGE),
        ));
    }
    Ok(PageRequest {
        first: first as u64,
        after: after.as_deref().map(decode_cursor).transpose()?,
    })
}

/// A Relay connection over a page of records, with opaque cursors.
pub fn connection<R, N: OutputType>(
    page: Page<R>,
    request: PageRequest,
    id_of: impl Fn(&R) -> Uuid,
    node: impl Fn(R) -> N,
) -> Connection<String, N> {
    let mut connection = Connection::new(request.after.is_some(), page.has_next);
    connection.edges.extend(
        page.items
            .into_iter()
            .map(|record| Edge::new(encode_cursor(id_of(&record)), node(record))),
    );
    connection
}

pub fn parse_id<T: std::str::FromStr<Err = Error>>(field: &str, id: &ID) -> Result<T> {
    id.parse::<T>()
        .map_err(|_| Error::bad_input(field, format!("not a valid id: {:?}", id.as_str())))
}

// ---- objects ------------------------------------------------------------------------------

pub struct UserObj(pub User);

#[Object(name = "User")]
impl UserObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn platform_admin(&self) -> bool {
        self.0.platform_admin
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// The user's tenants and roles. Only readable on yourself.
    async fn memberships(&self, ctx: &Context<'_>) -> ApiResult<Vec<MembershipObj>> {
        let me = identity(ctx)?;
        if me.user_id != self.0.id {
            return Err(
                Error::Forbidden("memberships are visible to their user only".into()).into(),
            );
        }
        let state = super::state(ctx);
        Ok(state
            .catalogue
            .memberships(me.user_id)
            .await?
            .into_iter()
            .map(MembershipObj)
            .collect())
    }
}

pub struct TenantObj(pub Tenant);

#[Object(name = "Tenant")]
impl TenantObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct MembershipObj(pub Membership);

#[Object(name = "Membership")]
impl MembershipObj {
    async fn tenant(&self) -> TenantObj {
        TenantObj(self.0.tenant.clone())
    }
    async fn role(&self) -> RoleGql {
        self.0.role.into()
    }
}

pub struct MemberObj(pub Member);

#[Object(name = "Member")]
impl MemberObj {
    async fn user(&self) -> UserObj {
        UserObj(self.0.user.clone())
    }
    async fn role(&self) -> RoleGql {
        self.0.role.into()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct ClusterObj(pub Cluster);

#[Object(name = "Cluster")]
impl ClusterObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// When the join token was last issued.
    async fn token_rotated_at(&self) -> DateTime<Utc> {
        self.0.token_rotated_at
    }
    /// Live workers (and departed ones still holding assignments), from the cluster's
    /// coordination state.
    async fn workers(&self, ctx: &Context<'_>) -> ApiResult<Vec<WorkerObj>> {
        let workers = super::state(ctx).cluster_view.workers(self.0.id).await?;
        Ok(workers.into_iter().map(WorkerObj).collect())
    }
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<Connection<String, TaskObj>> {
        let request = page_request(first, after)?;
        let filter = TaskFilter {
            cluster_id: Some(self.0.id),
            ..TaskFilter::default()
        };
        let page = tenant(ctx).await?.tasks(&filter, request).await?;
        Ok(connection(page, request, |t| t.id.into(), TaskObj::from))
    }
}

/// A cluster with its join token. The token is shown here once and stored hashed.
#[derive(SimpleObject)]
pub struct ClusterWithToken {
    pub cluster: ClusterObj,
    pub join_token: String,
}

#[derive(SimpleObject, Clone)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// What a task runs and when: the part of a task that is versioned.
pub struct TaskSpecObj(pub TaskSpec);

#[Object(name = "TaskSpec")]
impl TaskSpecObj {
    /// Cron expression: 5 fields, or 6 with leading seconds, optional year; `@hourly` etc.
    async fn schedule(&self) -> &str {
        &self.0.schedule
    }
    /// IANA timezone the schedule is evaluated in.
    async fn timezone(&self) -> &str {
        &self.0.timezone
    }
    /// Run as `sh -c <command>` in the unpacked package folder.
    async fn command(&self) -> &str {
        &self.0.command
    }
    async fn env(&self) -> Vec<EnvVar> {
        self.0
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }
    async fn timeout_seconds(&self) -> Option<u32> {
        self.0.timeout_seconds
    }
    async fn overlap_policy(&self) -> OverlapPolicyGql {
        self.0.overlap_policy.into()
    }
    async fn misfire_policy(&self) -> MisfirePolicyGql {
        self.0.misfire_policy.into()
    }
    async fn misfire_grace_seconds(&self) -> u32 {
        self.0.misfire_grace_seconds
    }
    async fn max_retries(&self) -> u32 {
        self.0.max_retries
    }
    async fn retry_backoff_seconds(&self) -> u32 {
        self.0.retry_backoff_seconds
    }
    async fn package_sha256(&self) -> Option<&str> {
        self.0.package_sha256.as_deref()
    }
    async fn active_from(&self) -> Option<DateTime<Utc>> {
        self.0.active_from
    }
    async fn active_until(&self) -> Option<DateTime<Utc>> {
        self.0.active_until
    }
    /// Worker labels the task needs; only matching workers run it.
    async fn labels(&self) -> &[String] {
        &self.0.labels
    }
    async fn notify_emails(&self) -> &[String] {
        &self.0.notify_emails
    }
}

/// The identity and lifecycle of a task; merged with its spec into `Task`.
pub struct TaskMeta(pub Task);

#[Object]
impl TaskMeta {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn description(&self) -> &str {
        &self.0.description
    }
    async fn cluster(&self, ctx: &Context<'_>) -> ApiResult<ClusterObj> {
        Ok(ClusterObj(
            tenant(ctx).await?.cluster(self.0.cluster_id).await?,
        ))
    }
    async fn state(&self) -> TaskStateGql {
        self.0.state.into()
    }
    /// Increments on every change of what runs or when (command, schedule, env,
    /// package, policies); not on renames or pause.
    async fn version(&self) -> u32 {
        self.0.version
    }
    /// Every version of the spec, newest first.
    async fn versions(&self, ctx: &Context<'_>) -> ApiResult<Vec<TaskVersionObj>> {
        let versions = tenant(ctx).await?.task_versions(self.0.id).await?;
        Ok(versions.into_iter().map(TaskVersionObj).collect())
    }
    async fn package(&self, ctx: &Context<'_>) -> ApiResult<Option<PackageObj>> {
        match &self.0.spec.package_sha256 {
            None => Ok(None),
            Some(sha) => Ok(Some(PackageObj(tenant(ctx).await?.package(sha).await?))),
        }
    }
    /// The next `count` (at most 100) fire times from now, in UTC, from the schedule and
    /// timezone. Shown for paused tasks too: what would fire once resumed.
    async fn next_fire_times(
        &self,
        #[graphql(default = 5)] count: i32,
    ) -> ApiResult<Vec<DateTime<Utc>>> {
        if !(0..=100).contains(&count) {
            return Err(Error::bad_input("count", "must be between 0 and 100").into());
        }
        // The schedule only: a stored task keeps answering when a rule about its other
        // fields has tightened since it was saved.
        let schedule = self.0.spec.parse_schedule()?;
        Ok(schedule.upcoming(Utc::now(), count as usize))
    }
    /// The worker that owns the task now; `null` while paused or while no live worker
    /// of the cluster can take it.
    async fn assigned_worker(&self, ctx: &Context<'_>) -> ApiResult<Option<WorkerObj>> {
        let view = &super::state(ctx).cluster_view;
        Ok(view
            .assigned_worker(self.0.cluster_id, self.0.id)
            .await?
            .map(WorkerObj))
    }
    /// The task's latest run.
    async fn last_run(&self, ctx: &Context<'_>) -> ApiResult<Option<RunObj>> {
        Ok(tenant(ctx).await?.last_run(self.0.id).await?.map(RunObj))
    }
    /// The task's runs, newest first.
    async fn runs(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<Connection<String, RunObj>> {
        let request = page_request(first, after)?;
        let filter = RunFilter {
            task_id: Some(self.0.id),
            status: None,
        };
        let page = tenant(ctx).await?.runs(&filter, request).await?;
        Ok(connection(page, request, |r| r.id.into(), RunObj))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

/// One fire of a task, or one manual run, and what became of it.
pub struct RunObj(pub Run);

/// Most log lines `Run.logs` returns at once.
pub const MAX_LOG_PAGE: i32 = 5_000;

#[Object(name = "Run")]
impl RunObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn task(&self, ctx: &Context<'_>) -> ApiResult<TaskObj> {
        Ok(tenant(ctx).await?.task(self.0.task_id).await?.into())
    }
    /// The task version the run ran.
    async fn task_version(&self) -> u32 {
        self.0.task_version
    }
    /// The fire time (UTC) this run is for; for a manual run, when it was asked for.
    async fn scheduled_at(&self) -> DateTime<Utc> {
        self.0.scheduled_at
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.0.started_at
    }
    async fn finished_at(&self) -> Option<DateTime<Utc>> {
        self.0.finished_at
    }
    async fn status(&self) -> RunStatusGql {
        self.0.status.into()
    }
    async fn trigger(&self) -> RunTriggerGql {
        self.0.trigger.into()
    }
    /// 0 for the first attempt of a fire, then 1, 2… for retries.
    async fn attempt(&self) -> u32 {
        self.0.attempt
    }
    async fn exit_code(&self) -> Option<i32> {
        self.0.exit_code
    }
    /// The signal that ended the process, if one did.
    async fn signal(&self) -> Option<i32> {
        self.0.signal
    }
    /// Why the run failed, was skipped, stopped or lost.
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    /// The worker that ran it.
    async fn worker(&self) -> Option<&str> {
        self.0.worker.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// Log lines from `fromOffset` (default 0), in order, at most `limit` (default and
    /// maximum 5000).
    async fn logs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 0)] from_offset: i32,
        #[graphql(default = 5000)] limit: i32,
    ) -> ApiResult<Vec<LogLineObj>> {
        if from_offset < 0 {
            return Err(Error::bad_input("fromOffset", "must not be negative").into());
        }
        if !(0..=MAX_LOG_PAGE).contains(&limit) {
            return Err(
                Error::bad_input("limit", format!("must be between 0 and {MAX_LOG_PAGE}")).into(),
            );
        }
        let lines = tenant(ctx)
            .await?
            .logs_of(&self.0, from_offset as u64, limit as u64)
            .await?;
        Ok(lines.into_iter().map(LogLineObj).collect())
    }
}

pub struct LogLineObj(pub LogLine);

#[Object(name = "LogLine")]
impl LogLineObj {
    async fn offset(&self) -> u64 {
        self.0.offset
    }
    async fn stream(&self) -> LogStreamGql {
        self.0.stream.into()
    }
    async fn at(&self) -> DateTime<Utc> {
        self.0.at
    }
    async fn text(&self) -> &str {
        &self.0.text
    }
}

/// Where a tenant's events go besides each task's own recipients.
pub struct NotificationSettingsObj(pub cloudtask_catalogue::notifications::TenantNotifications);

#[Object(name = "NotificationSettings")]
impl NotificationSettingsObj {
    /// Recipients of every failure and worker event.
    async fn notify_emails(&self) -> &[String] {
        &self.0.emails
    }
    async fn webhook_url(&self) -> Option<&str> {
        self.0.webhook_url.as_deref()
    }
}

/// A worker of a cluster.
pub struct WorkerObj(pub crate::cluster_view::WorkerInfo);

#[Object(name = "Worker")]
impl WorkerObj {
    /// The worker's name, unique in its cluster.
    async fn id(&self) -> ID {
        ID(self.0.name.clone())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn hostname(&self) -> Option<&str> {
        self.0.node.as_ref().map(|n| n.hostname.as_str())
    }
    /// Whether it holds a live session now.
    async fn online(&self) -> bool {
        self.0.node.is_some()
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.0.node.as_ref().map(|n| n.started_at)
    }
    /// Liveness is the coordination session: an online worker is seen now.
    async fn last_seen_at(&self) -> Option<DateTime<Utc>> {
        self.0.node.as_ref().map(|_| Utc::now())
    }
    async fn version(&self) -> Option<&str> {
        self.0.node.as_ref().map(|n| n.version.as_str())
    }
    async fn capacity(&self) -> Option<u32> {
        self.0.node.as_ref().map(|n| n.capacity)
    }
    async fn labels(&self) -> Vec<String> {
        self.0
            .node
            .as_ref()
            .map(|n| n.labels.iter().cloned().collect())
            .unwrap_or_default()
    }
    async fn assigned_task_count(&self) -> u64 {
        self.0.assigned
    }
}

#[derive(MergedObject)]
#[graphql(name = "Task")]
pub struct TaskObj(TaskMeta, TaskSpecObj);

impl From<Task> for TaskObj {
    fn from(task: Task) -> Self {
        let spec = task.spec.clone();
        TaskObj(TaskMeta(task), TaskSpecObj(spec))
    }
}

pub struct TaskVersionObj(pub TaskVersion);

#[Object(name = "TaskVersion")]
impl TaskVersionObj {
    async fn version(&self) -> u32 {
        self.0.version
    }
    async fn spec(&self) -> TaskSpecObj {
        TaskSpecObj(self.0.spec.clone())
    }
    async fn created_by(&self) -> Option<ID> {
        self.0.created_by.map(|u| ID(u.to_string()))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct PackageObj(pub PackageInfo);

#[Object(name = "Package")]
impl PackageObj {
    async fn sha256(&self) -> &str {
        &self.0.sha256
    }
    /// `zip` or `tar.gz`.
    async fn format(&self) -> &str {
        &self.0.format
    }
    async fn size_bytes(&self) -> u64 {
        self.0.size_bytes
    }
    async fn unpacked_bytes(&self) -> u64 {
        self.0.unpacked_bytes
    }
    async fn entries(&self) -> u64 {
        self.0.entries
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// Where the archive can be downloaded with the same bearer token.
    async fn download_path(&self) -> String {
        format!("/packages/{}", self.0.sha256)
    }
}

pub struct AuditEntryObj(pub AuditEntry);

#[Object(name = "AuditEntry")]
impl AuditEntryObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    /// The mutation, e.g. `createTask`.
    async fn operation(&self) -> &str {
        &self.0.operation
    }
    async fn object_type(&self) -> &str {
        &self.0.object_type
    }
    async fn object_id(&self) -> Option<&str> {
        self.0.object_id.as_deref()
    }
    async fn actor_id(&self) -> Option<ID> {
        self.0.actor_id.map(|u| ID(u.to_string()))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct AuthPayload {
    pub access_token: String,
    pub access_token_expires_at: DateTime<Utc>,
    /// Single use: each refresh returns a new one. Presenting a spent one revokes them all.
    pub refresh_token: String,
    pub user: UserObj,
    #[graphql(skip)]
    pub tenant_role: Option<(Tenant, cloudtask_core::roles::Role)>,
}

#[ComplexObject]
impl AuthPayload {
    /// The tenant the access token acts in, if any.
    async fn tenant(&self) -> Option<TenantObj> {
        self.tenant_role.as_ref().map(|(t, _)| TenantObj(t.clone()))
    }
    async fn role(&self) -> Option<RoleGql> {
        self.tenant_role.as_ref().map(|(_, r)| (*r).into())
    }
}

#[derive(SimpleObject)]
pub struct Dashboard {
    pub cluster_count: u64,
    pub task_count: u64,
    pub active_task_count: u64,
    pub paused_task_count: u64,
    pub member_count: u64,
}
