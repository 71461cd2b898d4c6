//! Tasks: `tasks`, `task`, creating, editing, pausing, cloning and deleting them; the
//! `Task` object (identity and lifecycle merged with its versioned spec) and its versions.

use async_graphql::connection::Connection;
use async_graphql::{Context, Enum, ID, MergedObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::RunFilter;
use cloudtask_catalogue::{Task, TaskVersion};
use cloudtask_core::Error;
use cloudtask_core::ids::TaskId;
use cloudtask_core::task::{TaskSpec, TaskState};

use super::args::{connection, page_request, parse_id};
use super::clusters::{ClusterObj, WorkerObj};
use super::inputs::{CreateTaskInput, TaskFilterInput, UpdateTaskInput};
use super::packages::{PackageObj, read_package};
use super::runs::RunObj;
use super::{state, tenant};
use crate::error::ApiResult;

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

#[derive(Default)]
pub struct TaskQuery;

#[Object]
impl TaskQuery {
    #[graphql(complexity = "super::cost::list(first, super::args::DEFAULT_PAGE, child_complexity)")]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<TaskFilterInput>,
    ) -> ApiResult<Connection<String, TaskObj>> {
        let request = page_request(first, after)?;
        let filter = filter.unwrap_or_default().parse()?;
        let page = tenant(ctx).await?.tasks(&filter, request).await?;
        Ok(connection(page, request, |t| t.id.into(), TaskObj::from))
    }

    /// A task of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<TaskObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(TaskObj::from(
            handle.task(parse_id("id", &id)?).await?,
        )))
    }
}

#[derive(Default)]
pub struct TaskMutation;

#[Object]
impl TaskMutation {
    async fn create_task(&self, ctx: &Context<'_>, input: CreateTaskInput) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        let (new, upload) = input.parse()?;
        let package = match &upload {
            Some(upload) => Some(read_package(ctx, "package", upload).await?),
            None => None,
        };
        Ok(handle.create_task(new, package).await?.into())
    }

    async fn update_task(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateTaskInput,
    ) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        let id: TaskId = parse_id("id", &id)?;
        let task = handle.update_task(id, |edit| input.apply(edit)).await?;
        Ok(task.into())
    }

    async fn pause_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle
            .set_task_state(parse_id("id", &id)?, TaskState::Paused)
            .await?
            .into())
    }

    async fn resume_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle
            .set_task_state(parse_id("id", &id)?, TaskState::Active)
            .await?
            .into())
    }

    /// A copy under a new name, starting again at version 1.
    async fn clone_task(&self, ctx: &Context<'_>, id: ID, name: String) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle.clone_task(parse_id("id", &id)?, &name).await?.into())
    }

    async fn delete_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<bool> {
        tenant(ctx).await?.delete_task(parse_id("id", &id)?).await?;
        Ok(true)
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
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
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
    #[graphql(complexity = "super::cost::list(Some(count), 5, child_complexity)")]
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
        let view = &state(ctx).cluster_view;
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
    #[graphql(complexity = "super::cost::list(first, super::args::DEFAULT_PAGE, child_complexity)")]
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
    /// The task's own limits for each run; null fields take the cluster's
    /// `defaultLimits`.
    async fn limits(&self) -> super::limits::RunLimitsObj {
        self.0.limits.into()
    }
}

#[derive(SimpleObject, Clone)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
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
