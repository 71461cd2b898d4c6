//! Run limits: a cluster's default limits for its tasks' runs (a task's own limits live in
//! its spec, with the rest of what a version fixes), and the reason a run ended as it did
//! (`OOM_KILLED`, `PIDS_LIMIT`, `OUTPUT_LIMIT`, …).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Clusters {
    Table,
    DefaultLimits,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    Reason,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Clusters::Table)
                .add_column(json_null(Clusters::DefaultLimits))
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .add_column(string_len_null(Runs::Reason, 32))
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .drop_column(Runs::Reason)
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Clusters::Table)
                .drop_column(Clusters::DefaultLimits)
                .take(),
        )
        .await
    }
}
