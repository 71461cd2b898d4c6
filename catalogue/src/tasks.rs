//! Tasks and their versions. A changed spec is a new version, kept in the history; every
//! change notifies the scheduler's mirror of the task's cluster, in its transaction.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, TaskId, TenantId, UserId};
use cloudtask_core::roles::Action;
use cloudtask_core::task::{TaskSpec, TaskState, validate_description, validate_name};
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use uuid::Uuid;

use crate::entities::{package, task, task_version};
use crate::error::{DbResult, conflict_as};
use crate::mirror_changes::notify;
use crate::packages::NewPackage;
use crate::{Catalogue, Page, PageRequest, TenantHandle, decode_spec, encode_spec, now};

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

#[derive(Debug, Clone)]
pub struct NewTask {
    pub cluster_id: ClusterId,
    pub name: String,
    pub description: String,
    pub state: TaskState,
    pub spec: TaskSpec,
}

/// The editable part of a task, handed to an update closure.
#[derive(Debug, Clone)]
pub struct TaskEdit {
    pub name: String,
    pub description: String,
    pub spec: TaskSpec,
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub cluster_id: Option<ClusterId>,
    pub state: Option<TaskState>,
    pub name_contains: Option<String>,
}

impl TryFrom<task::Model> for Task {
    type Error = Error;

    fn try_from(m: task::Model) -> Result<Self> {
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
            spec: decode_spec(m.spec)?,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

impl TryFrom<task_version::Model> for TaskVersion {
    type Error = Error;

    fn try_from(m: task_version::Model) -> Result<Self> {
        Ok(TaskVersion {
            task_id: m.task_id.into(),
            version: m.version as u32,
            spec: decode_spec(m.spec)?,
            created_by: m.created_by.map(Into::into),
            created_at: m.created_at,
        })
    }
}

impl Catalogue {
    /// Every task of a cluster, paused ones included (the scheduler).
    pub async fn tasks_of_cluster(&self, id: ClusterId) -> Result<Vec<Task>> {
        self.with_db(async |db| {
            let rows = task::Entity::find()
                .filter(task::Column::ClusterId.eq(Uuid::from(id)))
                .order_by_asc(task::Column::Id)
                .all(db)
                .await?;
            Ok(rows
                .into_iter()
                .map(Task::try_from)
                .collect::<Result<_>>()?)
        })
        .await
    }
}

impl TenantHandle {
    pub async fn tasks(&self, filter: &TaskFilter, request: PageRequest) -> Result<Page<Task>> {
        self.reading(Action::Read, async |txn| {
            let mut query = self.find::<task::Entity>();
            if let Some(cluster_id) = filter.cluster_id {
                query = query.filter(task::Column::ClusterId.eq(Uuid::from(cluster_id)));
            }
            if let Some(state) = filter.state {
                query = query.filter(task::Column::State.eq(state.as_str()));
            }
            if let Some(name) = &filter.name_contains {
                query = query.filter(task::Column::Name.contains(name));
            }
            if let Some(after) = request.after {
                query = query.filter(task::Column::Id.gt(after));
            }
            let rows = query
                .order_by_asc(task::Column::Id)
                .limit(request.limit())
                .all(txn)
                .await?;
            let tasks = rows
                .into_iter()
                .map(Task::try_from)
                .collect::<Result<Vec<_>>>()?;
            Ok(request.page(tasks))
        })
        .await
    }

    pub async fn task_count(&self, state: Option<TaskState>) -> Result<u64> {
        self.reading(Action::Read, async |txn| {
            let mut query = self.find::<task::Entity>();
            if let Some(state) = state {
                query = query.filter(task::Column::State.eq(state.as_str()));
            }
            Ok(query.count(txn).await?)
        })
        .await
    }

    pub(crate) async fn task_model(
        &self,
        conn: &impl ConnectionTrait,
        id: TaskId,
    ) -> DbResult<task::Model> {
        Ok(self
            .find::<task::Entity>()
            .filter(task::Column::Id.eq(Uuid::from(id)))
            .one(conn)
            .await?
            .ok_or(Error::NotFound("task"))?)
    }

    pub async fn task(&self, id: TaskId) -> Result<Task> {
        self.reading(Action::Read, async |txn| {
            Ok(self.task_model(txn, id).await?.try_into()?)
        })
        .await
    }

    async fn check_package(&self, conn: &impl ConnectionTrait, spec: &TaskSpec) -> DbResult<()> {
        if let Some(sha) = &spec.package_sha256 {
            let found = self
                .find::<package::Entity>()
                .filter(package::Column::Sha256.eq(sha.as_str()))
                .count(conn)
                .await?;
            if found == 0 {
                Err(Error::bad_input(
                    "package",
                    "no such package in this tenant",
                ))?;
            }
        }
        Ok(())
    }

    async fn insert_version(
        &self,
        conn: &impl ConnectionTrait,
        task_id: Uuid,
        version: i32,
        spec: &TaskSpec,
    ) -> DbResult<()> {
        task_version::Entity::insert(task_version::ActiveModel {
            task_id: Set(task_id),
            version: Set(version),
            spec: Set(encode_spec(spec)),
            created_by: Set(Some(self.user_id().into())),
            created_at: Set(now()),
        })
        .exec(conn)
        .await?;
        Ok(())
    }

    async fn insert_task(&self, conn: &impl ConnectionTrait, new: NewTask) -> DbResult<Task> {
        validate_name("name", &new.name)?;
        validate_description(&new.description)?;
        new.spec.validate()?;
        self.cluster_model(conn, new.cluster_id).await?;
        self.check_package(conn, &new.spec).await?;
        let now = now();
        let id = TaskId::new();
        let model = task::Entity::insert(task::ActiveModel {
            id: Set(id.into()),
            tenant_id: Set(self.tenant_id().into()),
            cluster_id: Set(new.cluster_id.into()),
            name: Set(new.name.trim().to_owned()),
            description: Set(new.description),
            state: Set(new.state.as_str().into()),
            version: Set(1),
            spec: Set(encode_spec(&new.spec)),
            package_sha256: Set(new.spec.package_sha256.clone()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .exec_with_returning(conn)
        .await
        .map_err(conflict_as("a task with this name"))?;
        self.insert_version(conn, id.into(), 1, &new.spec).await?;
        notify(conn, new.cluster_id).await?;
        Ok(model.try_into()?)
    }

    /// Creates a task, storing its package in the same transaction: a refused task
    /// leaves no package behind.
    pub async fn create_task(&self, mut new: NewTask, package: Option<NewPackage>) -> Result<Task> {
        self.require(Action::EditTask).await?;
        if package.is_some() {
            self.require(Action::UploadPackage).await?;
        }
        self.scoped(Action::EditTask, async |txn| {
            if let Some(package) = package {
                new.spec.package_sha256 = Some(package.sha256.clone());
                self.insert_package(txn, package).await?;
            }
            let task = self.insert_task(txn, new).await?;
            self.audit(txn, "createTask", "task", task.id).await?;
            Ok(task)
        })
        .await
    }

    /// Applies `edit` to the current task. A changed spec is a new version, recorded in
    /// the history. The write is conditional on the version and update time read, so a
    /// concurrent edit makes this one fail with CONFLICT instead of being lost.
    pub async fn update_task(
        &self,
        id: TaskId,
        edit: impl FnOnce(&mut TaskEdit) -> Result<()>,
    ) -> Result<Task> {
        self.edit_task(Action::EditTask, id, "updateTask", None, edit)
            .await
    }

    /// Stores the package and points the task at it (a new version), in one transaction.
    pub async fn set_task_package(&self, id: TaskId, package: NewPackage) -> Result<Task> {
        let sha256 = package.sha256.clone();
        let action = Action::UploadPackage;
        self.edit_task(action, id, "uploadPackage", Some(package), |edit| {
            edit.spec.package_sha256 = Some(sha256);
            Ok(())
        })
        .await
    }

    async fn edit_task(
        &self,
        action: Action,
        id: TaskId,
        operation: &str,
        package: Option<NewPackage>,
        edit: impl FnOnce(&mut TaskEdit) -> Result<()>,
    ) -> Result<Task> {
        self.scoped(action, async |txn| {
            if let Some(package) = package {
                self.task_model(txn, id).await?;
                self.insert_package(txn, package).await?;
            }
            let current: Task = self.task_model(txn, id).await?.try_into()?;
            let mut draft = TaskEdit {
                name: current.name.clone(),
                description: current.description.clone(),
                spec: current.spec.clone(),
            };
            edit(&mut draft)?;
            validate_name("name", &draft.name)?;
            validate_description(&draft.description)?;
            draft.spec.validate()?;
            if draft.spec.package_sha256 != current.spec.package_sha256 {
                self.check_package(txn, &draft.spec).await?;
            }
            let spec_changed = draft.spec != current.spec;
            let version = current.version as i32 + i32::from(spec_changed);
            let updated = task::Entity::update_many()
                .col_expr(
                    task::Column::Name,
                    Expr::value(draft.name.trim().to_owned()),
                )
                .col_expr(task::Column::Description, Expr::value(draft.description))
                .col_expr(task::Column::Spec, Expr::value(encode_spec(&draft.spec)))
                .col_expr(
                    task::Column::PackageSha256,
                    Expr::value(draft.spec.package_sha256.clone()),
                )
                .col_expr(task::Column::Version, Expr::value(version))
                .col_expr(task::Column::UpdatedAt, Expr::value(now()))
                .filter(self.within::<task::Entity>())
                .filter(task::Column::Id.eq(Uuid::from(id)))
                .filter(task::Column::Version.eq(current.version as i32))
                .filter(task::Column::UpdatedAt.eq(current.updated_at))
                .exec(txn)
                .await
                .map_err(conflict_as("a task with this name"))?;
            if updated.rows_affected != 1 {
                Err(Error::Conflict("the task changed meanwhile; retry".into()))?;
            }
            if spec_changed {
                self.insert_version(txn, id.into(), version, &draft.spec)
                    .await?;
            }
            self.audit(txn, operation, "task", id).await?;
            notify(txn, current.cluster_id).await?;
            Ok(self.task_model(txn, id).await?.try_into()?)
        })
        .await
    }

    pub async fn set_task_state(&self, id: TaskId, state: TaskState) -> Result<Task> {
        self.scoped(Action::PauseTask, async |txn| {
            let current = self.task_model(txn, id).await?;
            task::Entity::update_many()
                .col_expr(task::Column::State, Expr::value(state.as_str()))
                .col_expr(task::Column::UpdatedAt, Expr::value(now()))
                .filter(self.within::<task::Entity>())
                .filter(task::Column::Id.eq(Uuid::from(id)))
                .exec(txn)
                .await?;
            let operation = match state {
                TaskState::Active => "resumeTask",
                TaskState::Paused => "pauseTask",
            };
            self.audit(txn, operation, "task", id).await?;
            notify(txn, current.cluster_id.into()).await?;
            Ok(self.task_model(txn, id).await?.try_into()?)
        })
        .await
    }

    /// A new task with the same cluster, spec and state, under a new name, at version 1.
    pub async fn clone_task(&self, id: TaskId, name: &str) -> Result<Task> {
        self.scoped(Action::EditTask, async |txn| {
            let source: Task = self.task_model(txn, id).await?.try_into()?;
            let copy = NewTask {
                cluster_id: source.cluster_id,
                name: name.to_owned(),
                description: source.description,
                state: source.state,
                spec: source.spec,
            };
            let clone = self.insert_task(txn, copy).await?;
            self.audit(txn, "cloneTask", "task", clone.id).await?;
            Ok(clone)
        })
        .await
    }

    pub async fn delete_task(&self, id: TaskId) -> Result<()> {
        self.scoped(Action::EditTask, async |txn| {
            let current = self.task_model(txn, id).await?;
            task::Entity::delete_many()
                .filter(self.within::<task::Entity>())
                .filter(task::Column::Id.eq(Uuid::from(id)))
                .exec(txn)
                .await?;
            self.audit(txn, "deleteTask", "task", id).await?;
            notify(txn, current.cluster_id.into()).await
        })
        .await
    }

    /// Every version of the task, newest first.
    pub async fn task_versions(&self, id: TaskId) -> Result<Vec<TaskVersion>> {
        self.reading(Action::Read, async |txn| {
            self.task_model(txn, id).await?;
            let rows = self
                .find::<task_version::Entity>()
                .filter(task_version::Column::TaskId.eq(Uuid::from(id)))
                .order_by_desc(task_version::Column::Version)
                .all(txn)
                .await?;
            Ok(rows
                .into_iter()
                .map(TaskVersion::try_from)
                .collect::<Result<_>>()?)
        })
        .await
    }
}
