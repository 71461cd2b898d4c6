//! Manual run control: a stop asked for by a user is recorded on the run, so the
//! scheduler leader (any leader, after a failover too) can deliver it to the run's worker.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    StopRequestedAt,
    Status,
    ClusterId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .add_column(timestamp_with_time_zone_null(Runs::StopRequestedAt))
                .take(),
        )
        .await?;
        // The leader looks for queued and stop-requested runs of a cluster.
        m.create_index(
            Index::create()
                .name("ix_runs_cluster_status")
                .table(Runs::Table)
                .col(Runs::ClusterId)
                .col(Runs::Status)
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("ix_runs_cluster_status")
                .table(Runs::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Runs::Table)
                .drop_column(Runs::StopRequestedAt)
                .take(),
        )
        .await
    }
}
