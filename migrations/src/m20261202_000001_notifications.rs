//! Notification channels: per-tenant default recipients and webhook, and the outbox's
//! delivery state (channel, grouping, the sender's lease).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    NotifyEmails,
    WebhookUrl,
    WebhookSecret,
}

#[derive(DeriveIden)]
enum NotificationOutbox {
    Table,
    Channel,
    GroupKey,
    LockedUntil,
    SentAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        let tenant_columns = [
            json_null(Tenants::NotifyEmails),
            text_null(Tenants::WebhookUrl),
            text_null(Tenants::WebhookSecret),
        ];
        for column in tenant_columns {
            let mut column = column;
            m.alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(&mut column)
                    .take(),
            )
            .await?;
        }
        let outbox_columns = [
            string(NotificationOutbox::Channel).default("email").take(),
            text_null(NotificationOutbox::GroupKey),
            timestamp_with_time_zone_null(NotificationOutbox::LockedUntil),
        ];
        for column in outbox_columns {
            let mut column = column;
            m.alter_table(
                Table::alter()
                    .table(NotificationOutbox::Table)
                    .add_column(&mut column)
                    .take(),
            )
            .await?;
        }
        // The digest rule looks for the latest mail of a group (a task's failures).
        m.create_index(
            Index::create()
                .name("ix_outbox_group_sent")
                .table(NotificationOutbox::Table)
                .col(NotificationOutbox::GroupKey)
                .col(NotificationOutbox::SentAt)
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("ix_outbox_group_sent")
                .table(NotificationOutbox::Table)
                .to_owned(),
        )
        .await?;
        for column in [
            NotificationOutbox::Channel,
            NotificationOutbox::GroupKey,
            NotificationOutbox::LockedUntil,
        ] {
            m.alter_table(
                Table::alter()
                    .table(NotificationOutbox::Table)
                    .drop_column(column)
                    .take(),
            )
            .await?;
        }
        for column in [
            Tenants::NotifyEmails,
            Tenants::WebhookUrl,
            Tenants::WebhookSecret,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .drop_column(column)
                    .take(),
            )
            .await?;
        }
        Ok(())
    }
}
