//! Everything inside one tenant. A [`TenantHandle`] is the capability: it is built from a
//! verified identity whose membership was checked, it filters every query by its tenant,
//! and it asks the role matrix before each operation. Another tenant's object is simply
//! not found.

use cloudtask_core::archive::ArchiveSummary;
use cloudtask_core::ids::{ClusterId, TaskId, TenantId, UserId};
use cloudtask_core::roles::{Action, Role};
use cloudtask_core::task::{TaskSpec, TaskState, validate_description, validate_name};
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use crate::accounts::{NewUser, audit, find_user_by_email, insert_package_if_absent, insert_user};
use crate::changes::notify;
use crate::entities::{cluster, membership, package, task, task_version, tenant, user};
use crate::records::{AuditEntry, Cluster, Member, PackageInfo, Task, TaskVersion, Tenant, User};
use crate::{Catalogue, MAX_PAGE, Page, PageRequest, conflict_or, db_err, encode_spec, now};

/// Who is acting, as the verified token says.
#[derive(Debug, Clone)]
pub struct Scope {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    /// Shown in the audit log.
    pub actor: String,
}

#[derive(Debug, Clone)]
pub struct TenantHandle {
    pub(crate) db: DatabaseConnection,
    pub(crate) hub: std::sync::Arc<crate::events::Hub>,
    tenant_id: TenantId,
    user_id: UserId,
    actor: String,
    role: Role,
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub cluster_id: ClusterId,
    pub name: String,
    pub description: String,
    pub state: TaskState,
    pub spec: TaskSpec,
}

/// An inspected archive to store with a task write, content-addressed by its sha256.
#[derive(Debug, Clone)]
pub struct NewPackage {
    pub sha256: String,
    pub summary: ArchiveSummary,
    pub content: Vec<u8>,
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

impl Catalogue {
    /// The tenant handle for a verified identity. The membership is read now, so a role
    /// change or removal takes effect at once, whatever an older token says.
    pub async fn tenant(&self, scope: Scope) -> Result<TenantHandle> {
        let role = self
            .role_in(scope.user_id, scope.tenant_id)
            .await?
            .ok_or_else(|| Error::Forbidden("not a member of this tenant".into()))?;
        Ok(TenantHandle {
            db: self.db.clone(),
            hub: self.hub.clone(),
            tenant_id: scope.tenant_id,
            user_id: scope.user_id,
            actor: scope.actor,
            role,
        })
    }
}

fn page<T>(mut rows: Vec<T>, request: PageRequest) -> Page<T> {
    let first = request.first.min(MAX_PAGE) as usize;
    let has_next = rows.len() > first;
    rows.truncate(first);
    Page {
        items: rows,
        has_next,
    }
}

fn limit(request: PageRequest) -> u64 {
    request.first.min(MAX_PAGE) + 1
}

impl TenantHandle {
    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub(crate) fn require(&self, action: Action) -> Result<()> {
        if self.role.allows(action) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    pub(crate) async fn audit(
        &self,
        conn: &impl ConnectionTrait,
        operation: &str,
        object_type: &str,
        object_id: impl ToString,
    ) -> Result<()> {
        audit(
            conn,
            Some(self.tenant_id),
            Some((self.user_id, &self.actor)),
            operation,
            object_type,
            Some(object_id.to_string()),
        )
        .await
    }

    pub async fn tenant(&self) -> Result<Tenant> {
        tenant::Entity::find_by_id(Uuid::from(self.tenant_id))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(Into::into)
            .ok_or(Error::NotFound("tenant"))
    }

    // ---- clusters -------------------------------------------------------------------

    pub async fn clusters(&self) -> Result<Vec<Cluster>> {
        self.require(Action::Read)?;
        let rows = cluster::Entity::find()
            .filter(cluster::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .order_by_asc(cluster::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn cluster_model(
        &self,
        conn: &impl ConnectionTrait,
        id: ClusterId,
    ) -> Result<cluster::Model> {
        cluster::Entity::find_by_id(Uuid::from(id))
            .filter(cluster::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .one(conn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("cluster"))
    }

    pub async fn cluster(&self, id: ClusterId) -> Result<Cluster> {
        self.require(Action::Read)?;
        Ok(self.cluster_model(&self.db, id).await?.into())
    }

    /// `join_token_hash`: the caller generates the token, shows it once, stores the hash.
    pub async fn create_cluster(&self, name: &str, join_token_hash: String) -> Result<Cluster> {
        self.require(Action::ManageClusters)?;
        validate_name("name", name)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let now = now();
        let model = cluster::Entity::insert(cluster::ActiveModel {
            id: Set(ClusterId::new().into()),
            tenant_id: Set(self.tenant_id.into()),
            name: Set(name.trim().to_owned()),
            join_token_hash: Set(join_token_hash),
            token_rotated_at: Set(now),
            created_at: Set(now),
        })
        .exec_with_returning(&txn)
        .await
        .map_err(|e| conflict_or(e, "a cluster with this name"))?;
        let cluster = Cluster::from(model);
        self.audit(&txn, "createCluster", "cluster", cluster.id)
            .await?;
        notify(&txn, cluster.id).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(cluster)
    }

    pub async fn rotate_cluster_token(
        &self,
        id: ClusterId,
        join_token_hash: String,
    ) -> Result<Cluster> {
        self.require(Action::ManageClusters)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let mut model = self.cluster_model(&txn, id).await?;
        model.join_token_hash = join_token_hash;
        model.token_rotated_at = now();
        cluster::Entity::update_many()
            .col_expr(
                cluster::Column::JoinTokenHash,
                Expr::value(model.join_token_hash.clone()),
            )
            .col_expr(
                cluster::Column::TokenRotatedAt,
                Expr::value(model.token_rotated_at),
            )
            .filter(cluster::Column::Id.eq(Uuid::from(id)))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        self.audit(&txn, "rotateClusterToken", "cluster", id)
            .await?;
        txn.commit().await.map_err(db_err)?;
        Ok(model.into())
    }

    /// Refused while the cluster still holds tasks: deleting them silently would surprise.
    pub async fn delete_cluster(&self, id: ClusterId) -> Result<()> {
        self.require(Action::ManageClusters)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        self.cluster_model(&txn, id).await?;
        let tasks = task::Entity::find()
            .filter(task::Column::ClusterId.eq(Uuid::from(id)))
            .count(&txn)
            .await
            .map_err(db_err)?;
        if tasks > 0 {
            return Err(Error::Conflict(format!(
                "the cluster still has {tasks} task(s); delete or move them first"
            )));
        }
        cluster::Entity::delete_by_id(Uuid::from(id))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        self.audit(&txn, "deleteCluster", "cluster", id).await?;
        notify(&txn, id).await?;
        txn.commit().await.map_err(db_err)
    }

    // ---- tasks ----------------------------------------------------------------------

    pub async fn tasks(&self, filter: &TaskFilter, request: PageRequest) -> Result<Page<Task>> {
        self.require(Action::Read)?;
        let mut query =
            task::Entity::find().filter(task::Column::TenantId.eq(Uuid::from(self.tenant_id)));
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
            .limit(limit(request))
            .all(&self.db)
            .await
            .map_err(db_err)?;
        let tasks = rows
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>>>()?;
        Ok(page(tasks, request))
    }

    pub async fn task_count(&self, state: Option<TaskState>) -> Result<u64> {
        self.require(Action::Read)?;
        let mut query =
            task::Entity::find().filter(task::Column::TenantId.eq(Uuid::from(self.tenant_id)));
        if let Some(state) = state {
            query = query.filter(task::Column::State.eq(state.as_str()));
        }
        query.count(&self.db).await.map_err(db_err)
    }

    async fn task_model(&self, conn: &impl ConnectionTrait, id: TaskId) -> Result<task::Model> {
        task::Entity::find_by_id(Uuid::from(id))
            .filter(task::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .one(conn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("task"))
    }

    pub async fn task(&self, id: TaskId) -> Result<Task> {
        self.require(Action::Read)?;
        self.task_model(&self.db, id).await?.try_into()
    }

    async fn check_package(&self, conn: &impl ConnectionTrait, spec: &TaskSpec) -> Result<()> {
        if let Some(sha) = &spec.package_sha256 {
            let found = package::Entity::find_by_id((Uuid::from(self.tenant_id), sha.clone()))
                .one(conn)
                .await
                .map_err(db_err)?;
            if found.is_none() {
                return Err(Error::bad_input(
                    "package",
                    "no such package in this tenant",
                ));
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
    ) -> Result<()> {
        task_version::Entity::insert(task_version::ActiveModel {
            task_id: Set(task_id),
            version: Set(version),
            spec: Set(encode_spec(spec)),
            created_by: Set(Some(self.user_id.into())),
            created_at: Set(now()),
        })
        .exec(conn)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn insert_task(&self, conn: &impl ConnectionTrait, new: NewTask) -> Result<Task> {
        validate_name("name", &new.name)?;
        validate_description(&new.description)?;
        new.spec.validate()?;
        self.cluster_model(conn, new.cluster_id).await?;
        self.check_package(conn, &new.spec).await?;
        let now = now();
        let id = TaskId::new();
        let model = task::Entity::insert(task::ActiveModel {
            id: Set(id.into()),
            tenant_id: Set(self.tenant_id.into()),
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
        .map_err(|e| conflict_or(e, "a task with this name"))?;
        self.insert_version(conn, id.into(), 1, &new.spec).await?;
        notify(conn, new.cluster_id).await?;
        model.try_into()
    }

    /// Creates a task, storing its package in the same transaction: a refused task
    /// leaves no package behind.
    pub async fn create_task(&self, mut new: NewTask, package: Option<NewPackage>) -> Result<Task> {
        self.require(Action::EditTask)?;
        if package.is_some() {
            self.require(Action::UploadPackage)?;
        }
        let txn = self.db.begin().await.map_err(db_err)?;
        if let Some(package) = package {
            new.spec.package_sha256 = Some(package.sha256.clone());
            self.insert_package(&txn, package).await?;
        }
        let task = self.insert_task(&txn, new).await?;
        self.audit(&txn, "createTask", "task", task.id).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(task)
    }

    /// Applies `edit` to the current task. A changed spec is a new version, recorded in
    /// the history. The write is conditional on the version and update time read, so a
    /// concurrent edit makes this one fail with CONFLICT instead of being lost.
    pub async fn update_task(
        &self,
        id: TaskId,
        edit: impl FnOnce(&mut TaskEdit) -> Result<()>,
    ) -> Result<Task> {
        self.require(Action::EditTask)?;
        self.edit_task(id, "updateTask", None, edit).await
    }

    /// Stores the package and points the task at it (a new version), in one transaction.
    pub async fn set_task_package(&self, id: TaskId, package: NewPackage) -> Result<Task> {
        self.require(Action::UploadPackage)?;
        let sha256 = package.sha256.clone();
        self.edit_task(id, "uploadPackage", Some(package), |edit| {
            edit.spec.package_sha256 = Some(sha256);
            Ok(())
        })
        .await
    }

    async fn edit_task(
        &self,
        id: TaskId,
        operation: &str,
        package: Option<NewPackage>,
        edit: impl FnOnce(&mut TaskEdit) -> Result<()>,
    ) -> Result<Task> {
        let txn = self.db.begin().await.map_err(db_err)?;
        if let Some(package) = package {
            self.task_model(&txn, id).await?;
            self.insert_package(&txn, package).await?;
        }
        let current: Task = self.task_model(&txn, id).await?.try_into()?;
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
            self.check_package(&txn, &draft.spec).await?;
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
            .filter(task::Column::Id.eq(Uuid::from(id)))
            .filter(task::Column::Version.eq(current.version as i32))
            .filter(task::Column::UpdatedAt.eq(current.updated_at))
            .exec(&txn)
            .await
            .map_err(|e| conflict_or(e, "a task with this name"))?;
        if updated.rows_affected != 1 {
            return Err(Error::Conflict("the task changed meanwhile; retry".into()));
        }
        if spec_changed {
            self.insert_version(&txn, id.into(), version, &draft.spec)
                .await?;
        }
        self.audit(&txn, operation, "task", id).await?;
        notify(&txn, current.cluster_id).await?;
        let task = self.task_model(&txn, id).await?.try_into()?;
        txn.commit().await.map_err(db_err)?;
        Ok(task)
    }

    pub async fn set_task_state(&self, id: TaskId, state: TaskState) -> Result<Task> {
        self.require(Action::PauseTask)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let current = self.task_model(&txn, id).await?;
        task::Entity::update_many()
            .col_expr(task::Column::State, Expr::value(state.as_str()))
            .col_expr(task::Column::UpdatedAt, Expr::value(now()))
            .filter(task::Column::Id.eq(Uuid::from(id)))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        let operation = match state {
            TaskState::Active => "resumeTask",
            TaskState::Paused => "pauseTask",
        };
        self.audit(&txn, operation, "task", id).await?;
        notify(&txn, current.cluster_id.into()).await?;
        let task = self.task_model(&txn, id).await?.try_into()?;
        txn.commit().await.map_err(db_err)?;
        Ok(task)
    }

    /// A new task with the same cluster, spec and state, under a new name, at version 1.
    pub async fn clone_task(&self, id: TaskId, name: &str) -> Result<Task> {
        self.require(Action::EditTask)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let source: Task = self.task_model(&txn, id).await?.try_into()?;
        let clone = self
            .insert_task(
                &txn,
                NewTask {
                    cluster_id: source.cluster_id,
                    name: name.to_owned(),
                    description: source.description,
                    state: source.state,
                    spec: source.spec,
                },
            )
            .await?;
        self.audit(&txn, "cloneTask", "task", clone.id).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(clone)
    }

    pub async fn delete_task(&self, id: TaskId) -> Result<()> {
        self.require(Action::EditTask)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let current = self.task_model(&txn, id).await?;
        task::Entity::delete_by_id(Uuid::from(id))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        self.audit(&txn, "deleteTask", "task", id).await?;
        notify(&txn, current.cluster_id.into()).await?;
        txn.commit().await.map_err(db_err)
    }

    /// Every version of the task, newest first.
    pub async fn task_versions(&self, id: TaskId) -> Result<Vec<TaskVersion>> {
        self.require(Action::Read)?;
        self.task_model(&self.db, id).await?;
        let rows = task_version::Entity::find()
            .filter(task_version::Column::TaskId.eq(Uuid::from(id)))
            .order_by_desc(task_version::Column::Version)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(TaskVersion::try_from).collect()
    }

    // ---- packages -------------------------------------------------------------------

    /// Stores an inspected archive unless the tenant already holds the same bytes.
    async fn insert_package(&self, conn: &impl ConnectionTrait, package: NewPackage) -> Result<()> {
        insert_package_if_absent(
            conn,
            package::ActiveModel {
                tenant_id: Set(self.tenant_id.into()),
                sha256: Set(package.sha256.clone()),
                format: Set(package.summary.format.as_str().into()),
                size_bytes: Set(package.content.len() as i64),
                unpacked_bytes: Set(package.summary.unpacked_bytes as i64),
                entries: Set(package.summary.entries as i64),
                content: Set(package.content),
                created_at: Set(now()),
            },
        )
        .await
    }

    pub async fn package(&self, sha256: &str) -> Result<PackageInfo> {
        self.require(Action::Read)?;
        package::Entity::find_by_id((Uuid::from(self.tenant_id), sha256.to_owned()))
            .select_only()
            .columns([
                package::Column::TenantId,
                package::Column::Sha256,
                package::Column::Format,
                package::Column::SizeBytes,
                package::Column::UnpackedBytes,
                package::Column::Entries,
                package::Column::CreatedAt,
            ])
            .column_as(Expr::cust("NULL"), "content")
            .into_tuple::<(
                Uuid,
                String,
                String,
                i64,
                i64,
                i64,
                chrono::DateTime<chrono::Utc>,
            )>()
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(
                |(_, sha256, format, size, unpacked, entries, created_at)| PackageInfo {
                    sha256,
                    format,
                    size_bytes: size as u64,
                    unpacked_bytes: unpacked as u64,
                    entries: entries as u64,
                    created_at,
                },
            )
            .ok_or(Error::NotFound("package"))
    }

    pub async fn package_content(&self, sha256: &str) -> Result<Vec<u8>> {
        self.require(Action::Read)?;
        package::Entity::find_by_id((Uuid::from(self.tenant_id), sha256.to_owned()))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(|p| p.content)
            .ok_or(Error::NotFound("package"))
    }

    // ---- members --------------------------------------------------------------------

    pub async fn members(&self) -> Result<Vec<Member>> {
        self.require(Action::Read)?;
        let rows = membership::Entity::find()
            .filter(membership::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .order_by_asc(membership::Column::CreatedAt)
            .find_also_related(user::Entity)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(m, u)| member_of(m, u?))
            .collect())
    }

    async fn member_model(
        &self,
        conn: &impl ConnectionTrait,
        user_id: UserId,
    ) -> Result<(membership::Model, user::Model)> {
        let (m, u) = membership::Entity::find_by_id((self.tenant_id.into(), user_id.into()))
            .find_also_related(user::Entity)
            .one(conn)
            .await
            .map_err(db_err)?
            .ok_or(Error::NotFound("member"))?;
        Ok((m, u.ok_or(Error::NotFound("member"))?))
    }

    pub async fn member(&self, user_id: UserId) -> Result<Member> {
        self.require(Action::Read)?;
        let (m, u) = self.member_model(&self.db, user_id).await?;
        member_of(m, u).ok_or(Error::NotFound("member"))
    }

    fn require_for_role(&self, role: Role) -> Result<()> {
        self.require(if role == Role::Owner {
            Action::ManageOwners
        } else {
            Action::ManageMembers
        })
    }

    /// Adds a user to the tenant, creating the account when the email is new (then a
    /// password hash is required).
    pub async fn add_member(
        &self,
        email: &str,
        role: Role,
        password_hash: Option<String>,
    ) -> Result<Member> {
        self.require_for_role(role)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let user = match find_user_by_email(&txn, email).await? {
            Some(u) => User::from(u),
            None => {
                let password_hash = password_hash
                    .ok_or_else(|| Error::bad_input("password", "required for a new user"))?;
                insert_user(
                    &txn,
                    &NewUser {
                        email: email.into(),
                        password_hash,
                        platform_admin: false,
                    },
                )
                .await?
            }
        };
        let created_at = now();
        membership::Entity::insert(membership::ActiveModel {
            tenant_id: Set(self.tenant_id.into()),
            user_id: Set(user.id.into()),
            role: Set(role.as_str().into()),
            created_at: Set(created_at),
        })
        .exec(&txn)
        .await
        .map_err(|e| conflict_or(e, "this member"))?;
        self.audit(&txn, "addMember", "user", user.id).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(Member {
            user,
            tenant_id: self.tenant_id,
            role,
            created_at,
        })
    }

    async fn owner_count(&self, conn: &impl ConnectionTrait) -> Result<u64> {
        membership::Entity::find()
            .filter(membership::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .filter(membership::Column::Role.eq(Role::Owner.as_str()))
            .count(conn)
            .await
            .map_err(db_err)
    }

    pub async fn set_member_role(&self, user_id: UserId, role: Role) -> Result<Member> {
        self.require_for_role(role)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let (m, u) = self.member_model(&txn, user_id).await?;
        let current = Role::parse(&m.role).unwrap_or(Role::Viewer);
        self.require_for_role(current)?;
        if current == Role::Owner && role != Role::Owner && self.owner_count(&txn).await? <= 1 {
            return Err(Error::Conflict("a tenant keeps at least one owner".into()));
        }
        membership::Entity::update_many()
            .col_expr(membership::Column::Role, Expr::value(role.as_str()))
            .filter(membership::Column::TenantId.eq(Uuid::from(self.tenant_id)))
            .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        self.audit(&txn, "setMemberRole", "user", user_id).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(Member {
            user: u.into(),
            tenant_id: self.tenant_id,
            role,
            created_at: m.created_at,
        })
    }

    pub async fn remove_member(&self, user_id: UserId) -> Result<()> {
        self.require(Action::ManageMembers)?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let (m, _) = self.member_model(&txn, user_id).await?;
        if m.role == Role::Owner.as_str() {
            self.require(Action::ManageOwners)?;
            if self.owner_count(&txn).await? <= 1 {
                return Err(Error::Conflict("a tenant keeps at least one owner".into()));
            }
        }
        membership::Entity::delete_by_id((self.tenant_id.into(), user_id.into()))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        self.audit(&txn, "removeMember", "user", user_id).await?;
        txn.commit().await.map_err(db_err)
    }

    // ---- audit ----------------------------------------------------------------------

    /// The tenant's audit log, newest first.
    pub async fn audit_log(&self, request: PageRequest) -> Result<Page<AuditEntry>> {
        use crate::entities::audit;
        self.require(Action::ReadAudit)?;
        let mut query =
            audit::Entity::find().filter(audit::Column::TenantId.eq(Uuid::from(self.tenant_id)));
        if let Some(after) = request.after {
            query = query.filter(audit::Column::Id.lt(after));
        }
        let rows = query
            .order_by_desc(audit::Column::Id)
            .limit(limit(request))
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(page(rows.into_iter().map(Into::into).collect(), request))
    }
}

fn member_of(m: membership::Model, u: user::Model) -> Option<Member> {
    Some(Member {
        tenant_id: m.tenant_id.into(),
        role: Role::parse(&m.role)?,
        created_at: m.created_at,
        user: u.into(),
    })
}
