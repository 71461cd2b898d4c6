//! Catalogue migrations. Written with sea-query's schema builder, so the same migrations
//! create the catalogue on Postgres and on SQLite (standalone mode). The exceptions are
//! row-level security (`m20261215_000001_row_security`) and log lines kept without a
//! foreign key (`m20261217_000001_log_lines_without_fk`), Postgres-only and skipped on
//! SQLite; other Postgres-only features (LISTEN/NOTIFY for the scheduler) go behind one
//! module of the catalogue crate, with an in-process stand-in for SQLite.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_catalogue;
mod m20261201_000001_run_control;
mod m20261202_000001_notifications;
mod m20261215_000001_row_security;
mod m20261216_000001_run_limits;
mod m20261217_000001_log_lines_without_fk;
mod m20261218_000001_retention;
pub mod row_security;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_catalogue::Migration),
            Box::new(m20261201_000001_run_control::Migration),
            Box::new(m20261202_000001_notifications::Migration),
            Box::new(m20261215_000001_row_security::Migration),
            Box::new(m20261216_000001_run_limits::Migration),
            Box::new(m20261217_000001_log_lines_without_fk::Migration),
            Box::new(m20261218_000001_retention::Migration),
        ]
    }
}
