//! Retention: a tenant's own horizons and what the last pruning pass deleted (on
//! `tenants`), when a run's lines were pruned (`runs.logs_pruned_at`, its outcome kept),
//! and an index of the runs whose lines are still kept, so that a pass finds the next
//! ones to prune without walking those pruned before.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Retention,
    LastPrune,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    LogsPrunedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .add_column(json_null(Tenants::Retention))
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .add_column(json_null(Tenants::LastPrune))
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .add_column(timestamp_with_time_zone_null(Runs::LogsPrunedAt))
                .take(),
        )
        .await?;
        // Partial: the same words on Postgres and SQLite.
        m.get_connection()
            .execute_unprepared(
                "CREATE INDEX ix_runs_lines_kept ON runs (task_id, id) WHERE logs_pruned_at IS NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS ix_runs_lines_kept")
            .await?;
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .drop_column(Runs::LogsPrunedAt)
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .drop_column(Tenants::LastPrune)
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .drop_column(Tenants::Retention)
                .take(),
        )
        .await
    }
}
