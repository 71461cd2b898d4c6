use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Email,
    PasswordHash,
    PlatformAdmin,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Memberships {
    Table,
    TenantId,
    UserId,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum RefreshTokens {
    Table,
    Id,
    FamilyId,
    UserId,
    TenantId,
    TokenHash,
    ExpiresAt,
    UsedAt,
    RevokedAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Clusters {
    Table,
    Id,
    TenantId,
    Name,
    JoinTokenHash,
    TokenRotatedAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    TenantId,
    ClusterId,
    Name,
    Description,
    State,
    Version,
    Spec,
    /// Copy of the spec's package hash, so a worker's download can be authorised by index.
    PackageSha256,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum TaskVersions {
    Table,
    TaskId,
    Version,
    Spec,
    CreatedBy,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Packages {
    Table,
    TenantId,
    Sha256,
    Format,
    SizeBytes,
    UnpackedBytes,
    Entries,
    Content,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    TenantId,
    TaskId,
    ClusterId,
    TaskVersion,
    Trigger,
    ScheduledAt,
    /// Equal to `scheduled_at` for scheduled fires and their retries, NULL for manual runs:
    /// the unique key (task, fire_at, attempt) holds exactly for scheduled fires, portably
    /// (NULLs are distinct in unique indexes on Postgres and SQLite alike).
    FireAt,
    Attempt,
    Status,
    WorkerId,
    StartedAt,
    FinishedAt,
    ExitCode,
    Signal,
    Error,
    CreatedAt,
}

#[derive(DeriveIden)]
enum RunLogLines {
    Table,
    RunId,
    Offset,
    Stream,
    At,
    Line,
}

#[derive(DeriveIden)]
enum NotificationOutbox {
    Table,
    Id,
    TenantId,
    Kind,
    DedupKey,
    Payload,
    Attempts,
    NextAttemptAt,
    SentAt,
    LastError,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    TenantId,
    ActorId,
    Actor,
    Operation,
    ObjectType,
    ObjectId,
    CreatedAt,
}

fn fk(
    name: &str,
    from: (impl IntoIden, impl IntoIden),
    to: (impl IntoIden, impl IntoIden),
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(ForeignKeyAction::Cascade)
        .take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Tenants::Table)
                .col(pk_uuid(Tenants::Id))
                .col(string_uniq(Tenants::Name))
                .col(timestamp_with_time_zone(Tenants::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Users::Table)
                .col(pk_uuid(Users::Id))
                .col(string_uniq(Users::Email))
                .col(string(Users::PasswordHash))
                .col(boolean(Users::PlatformAdmin).default(false))
                .col(timestamp_with_time_zone(Users::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Memberships::Table)
                .col(uuid(Memberships::TenantId))
                .col(uuid(Memberships::UserId))
                .col(string(Memberships::Role))
                .col(timestamp_with_time_zone(Memberships::CreatedAt))
                .primary_key(
                    Index::create()
                        .col(Memberships::TenantId)
                        .col(Memberships::UserId),
                )
                .foreign_key(&mut fk(
                    "fk_memberships_tenant",
                    (Memberships::Table, Memberships::TenantId),
                    (Tenants::Table, Tenants::Id),
                ))
                .foreign_key(&mut fk(
                    "fk_memberships_user",
                    (Memberships::Table, Memberships::UserId),
                    (Users::Table, Users::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_memberships_user")
                .table(Memberships::Table)
                .col(Memberships::UserId)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(RefreshTokens::Table)
                .col(pk_uuid(RefreshTokens::Id))
                .col(uuid(RefreshTokens::FamilyId))
                .col(uuid(RefreshTokens::UserId))
                .col(uuid_null(RefreshTokens::TenantId))
                .col(string_uniq(RefreshTokens::TokenHash))
                .col(timestamp_with_time_zone(RefreshTokens::ExpiresAt))
                .col(timestamp_with_time_zone_null(RefreshTokens::UsedAt))
                .col(timestamp_with_time_zone_null(RefreshTokens::RevokedAt))
                .col(timestamp_with_time_zone(RefreshTokens::CreatedAt))
                .foreign_key(&mut fk(
                    "fk_refresh_tokens_user",
                    (RefreshTokens::Table, RefreshTokens::UserId),
                    (Users::Table, Users::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_refresh_tokens_family")
                .table(RefreshTokens::Table)
                .col(RefreshTokens::FamilyId)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Clusters::Table)
                .col(pk_uuid(Clusters::Id))
                .col(uuid(Clusters::TenantId))
                .col(string(Clusters::Name))
                .col(string_uniq(Clusters::JoinTokenHash))
                .col(timestamp_with_time_zone(Clusters::TokenRotatedAt))
                .col(timestamp_with_time_zone(Clusters::CreatedAt))
                .foreign_key(&mut fk(
                    "fk_clusters_tenant",
                    (Clusters::Table, Clusters::TenantId),
                    (Tenants::Table, Tenants::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_clusters_tenant_name")
                .table(Clusters::Table)
                .col(Clusters::TenantId)
                .col(Clusters::Name)
                .unique()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Tasks::Table)
                .col(pk_uuid(Tasks::Id))
                .col(uuid(Tasks::TenantId))
                .col(uuid(Tasks::ClusterId))
                .col(string(Tasks::Name))
                .col(text(Tasks::Description).default(""))
                .col(string(Tasks::State))
                .col(integer(Tasks::Version))
                .col(json(Tasks::Spec))
                .col(string_len_null(Tasks::PackageSha256, 64))
                .col(timestamp_with_time_zone(Tasks::CreatedAt))
                .col(timestamp_with_time_zone(Tasks::UpdatedAt))
                .foreign_key(&mut fk(
                    "fk_tasks_tenant",
                    (Tasks::Table, Tasks::TenantId),
                    (Tenants::Table, Tenants::Id),
                ))
                .foreign_key(&mut fk(
                    "fk_tasks_cluster",
                    (Tasks::Table, Tasks::ClusterId),
                    (Clusters::Table, Clusters::Id),
                ))
                .take(),
        )
        .await?;
        // Task lists page by (tenant, id); ids are UUID v7, so this is creation order.
        m.create_index(
            Index::create()
                .name("ux_tasks_tenant_id")
                .table(Tasks::Table)
                .col(Tasks::TenantId)
                .col(Tasks::Id)
                .unique()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_tasks_tenant_name")
                .table(Tasks::Table)
                .col(Tasks::TenantId)
                .col(Tasks::Name)
                .unique()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_tasks_cluster_package")
                .table(Tasks::Table)
                .col(Tasks::ClusterId)
                .col(Tasks::PackageSha256)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(TaskVersions::Table)
                .col(uuid(TaskVersions::TaskId))
                .col(integer(TaskVersions::Version))
                .col(json(TaskVersions::Spec))
                .col(uuid_null(TaskVersions::CreatedBy))
                .col(timestamp_with_time_zone(TaskVersions::CreatedAt))
                .primary_key(
                    Index::create()
                        .col(TaskVersions::TaskId)
                        .col(TaskVersions::Version),
                )
                .foreign_key(&mut fk(
                    "fk_task_versions_task",
                    (TaskVersions::Table, TaskVersions::TaskId),
                    (Tasks::Table, Tasks::Id),
                ))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Packages::Table)
                .col(uuid(Packages::TenantId))
                .col(string_len(Packages::Sha256, 64))
                .col(string(Packages::Format))
                .col(big_integer(Packages::SizeBytes))
                .col(big_integer(Packages::UnpackedBytes))
                .col(big_integer(Packages::Entries))
                .col(blob(Packages::Content))
                .col(timestamp_with_time_zone(Packages::CreatedAt))
                .primary_key(
                    Index::create()
                        .col(Packages::TenantId)
                        .col(Packages::Sha256),
                )
                .foreign_key(&mut fk(
                    "fk_packages_tenant",
                    (Packages::Table, Packages::TenantId),
                    (Tenants::Table, Tenants::Id),
                ))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Runs::Table)
                .col(pk_uuid(Runs::Id))
                .col(uuid(Runs::TenantId))
                .col(uuid(Runs::TaskId))
                .col(uuid(Runs::ClusterId))
                .col(integer(Runs::TaskVersion))
                .col(string(Runs::Trigger))
                .col(timestamp_with_time_zone(Runs::ScheduledAt))
                .col(timestamp_with_time_zone_null(Runs::FireAt))
                .col(integer(Runs::Attempt))
                .col(string(Runs::Status))
                .col(string_null(Runs::WorkerId))
                .col(timestamp_with_time_zone_null(Runs::StartedAt))
                .col(timestamp_with_time_zone_null(Runs::FinishedAt))
                .col(integer_null(Runs::ExitCode))
                .col(integer_null(Runs::Signal))
                .col(text_null(Runs::Error))
                .col(timestamp_with_time_zone(Runs::CreatedAt))
                .foreign_key(&mut fk(
                    "fk_runs_task",
                    (Runs::Table, Runs::TaskId),
                    (Tasks::Table, Tasks::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_runs_fire")
                .table(Runs::Table)
                .col(Runs::TaskId)
                .col(Runs::FireAt)
                .col(Runs::Attempt)
                .unique()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_runs_tenant_id")
                .table(Runs::Table)
                .col(Runs::TenantId)
                .col(Runs::Id)
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_runs_task_id")
                .table(Runs::Table)
                .col(Runs::TaskId)
                .col(Runs::Id)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(RunLogLines::Table)
                .col(uuid(RunLogLines::RunId))
                .col(big_integer(RunLogLines::Offset))
                .col(string(RunLogLines::Stream))
                .col(timestamp_with_time_zone(RunLogLines::At))
                .col(text(RunLogLines::Line))
                .primary_key(
                    Index::create()
                        .col(RunLogLines::RunId)
                        .col(RunLogLines::Offset),
                )
                .foreign_key(&mut fk(
                    "fk_run_log_lines_run",
                    (RunLogLines::Table, RunLogLines::RunId),
                    (Runs::Table, Runs::Id),
                ))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(NotificationOutbox::Table)
                .col(pk_uuid(NotificationOutbox::Id))
                .col(uuid_null(NotificationOutbox::TenantId))
                .col(string(NotificationOutbox::Kind))
                .col(string_uniq(NotificationOutbox::DedupKey))
                .col(json(NotificationOutbox::Payload))
                .col(integer(NotificationOutbox::Attempts).default(0))
                .col(timestamp_with_time_zone(NotificationOutbox::NextAttemptAt))
                .col(timestamp_with_time_zone_null(NotificationOutbox::SentAt))
                .col(text_null(NotificationOutbox::LastError))
                .col(timestamp_with_time_zone(NotificationOutbox::CreatedAt))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_outbox_pending")
                .table(NotificationOutbox::Table)
                .col(NotificationOutbox::SentAt)
                .col(NotificationOutbox::NextAttemptAt)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(AuditLog::Table)
                .col(pk_uuid(AuditLog::Id))
                .col(uuid_null(AuditLog::TenantId))
                .col(uuid_null(AuditLog::ActorId))
                .col(string(AuditLog::Actor))
                .col(string(AuditLog::Operation))
                .col(string(AuditLog::ObjectType))
                .col(string_null(AuditLog::ObjectId))
                .col(timestamp_with_time_zone(AuditLog::CreatedAt))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_audit_tenant_id")
                .table(AuditLog::Table)
                .col(AuditLog::TenantId)
                .col(AuditLog::Id)
                .take(),
        )
        .await?;
        Ok(())
    }
}
