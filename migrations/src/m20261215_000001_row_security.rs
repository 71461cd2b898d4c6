//! Row-level security, Postgres only: a second wall under the catalogue's scoped handles.
//!
//! Two runtime roles that log in as nobody and do not bypass RLS: `cloudtask_tenant`
//! (a tenant handle's transactions) and `cloudtask_cluster` (a cluster handle's). The
//! handle's transaction takes its role with `SET LOCAL ROLE` and names its tenant or
//! cluster in a transaction-local setting; the policies below keep each role to those
//! rows. The owner role (`cloudtask migrate`, the scheduler's cross-tenant access, the
//! platform operations) owns the tables and so is not subject to them.
//!
//! Roles belong to the whole Postgres cluster, not one database: they are created only
//! when missing (tolerating a concurrent creation by another database's migration), and
//! only granted here, per database. Creating them needs CREATEROLE, unless an operator
//! created them beforehand. SQLite (standalone) migrates past this as a no-op.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::row_security::{CLUSTER_ROLE, CLUSTER_SETTING, TENANT_ROLE, TENANT_SETTING};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Tables a tenant role's policy filters by `tenant_id`.
const TENANT_OWNED: [&str; 6] = [
    "clusters",
    "tasks",
    "packages",
    "memberships",
    "runs",
    "audit_log",
];

/// Every table that carries a policy.
const WALLED: [&str; 10] = [
    "tenants",
    "clusters",
    "tasks",
    "task_versions",
    "packages",
    "memberships",
    "runs",
    "run_log_lines",
    "audit_log",
    "notification_outbox",
];

fn setting(name: &str) -> String {
    format!("NULLIF(current_setting('{name}', true), '')::uuid")
}

/// Creates the role unless it exists (another database's migration may race us).
fn create_role(role: &str) -> String {
    format!(
        "DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;"
    )
}

/// The statements of `up`, in order.
fn up_statements() -> Vec<String> {
    let tenant = setting(TENANT_SETTING);
    let cluster = setting(CLUSTER_SETTING);
    let cluster_tenant = format!("(SELECT c.tenant_id FROM clusters c WHERE c.id = {cluster})");
    let mut sql = vec![
        create_role(TENANT_ROLE),
        create_role(CLUSTER_ROLE),
        // A migrating role that is not a superuser must be a member to SET ROLE.
        format!(
            "DO $$ BEGIN
                IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                    EXECUTE format('GRANT {TENANT_ROLE}, {CLUSTER_ROLE} TO %I', current_user);
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END $$;"
        ),
        format!(
            "DO $$ BEGIN
                EXECUTE format('GRANT USAGE ON SCHEMA %I TO {TENANT_ROLE}, {CLUSTER_ROLE}',
                               current_schema());
            END $$;"
        ),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE
                ON clusters, tasks, task_versions, packages, memberships, runs TO {TENANT_ROLE}"
        ),
        format!("GRANT SELECT, UPDATE ON tenants TO {TENANT_ROLE}"),
        format!("GRANT SELECT, INSERT ON users, audit_log TO {TENANT_ROLE}"),
        format!("GRANT SELECT ON run_log_lines TO {TENANT_ROLE}"),
        format!("GRANT SELECT ON tenants, clusters, tasks, packages TO {CLUSTER_ROLE}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON runs TO {CLUSTER_ROLE}"),
        format!("GRANT SELECT, INSERT ON run_log_lines, notification_outbox TO {CLUSTER_ROLE}"),
    ];
    for table in WALLED {
        sql.push(format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"));
    }
    let mut policy = |table: &str, role: &str, condition: &str| {
        sql.push(format!(
            "CREATE POLICY {role}_wall ON {table} TO {role} USING ({condition}) WITH CHECK ({condition})"
        ));
    };
    policy("tenants", TENANT_ROLE, &format!("id = {tenant}"));
    for table in TENANT_OWNED {
        policy(table, TENANT_ROLE, &format!("tenant_id = {tenant}"));
    }
    // Children reach their parent through the parent's own policy.
    let of_task = "EXISTS (SELECT 1 FROM tasks t WHERE t.id = task_versions.task_id)";
    let of_run = "EXISTS (SELECT 1 FROM runs r WHERE r.id = run_log_lines.run_id)";
    policy("task_versions", TENANT_ROLE, of_task);
    policy("run_log_lines", TENANT_ROLE, of_run);

    policy("clusters", CLUSTER_ROLE, &format!("id = {cluster}"));
    policy("tasks", CLUSTER_ROLE, &format!("cluster_id = {cluster}"));
    policy("runs", CLUSTER_ROLE, &format!("cluster_id = {cluster}"));
    policy("run_log_lines", CLUSTER_ROLE, of_run);
    policy("tenants", CLUSTER_ROLE, &format!("id = {cluster_tenant}"));
    for table in ["packages", "notification_outbox"] {
        policy(
            table,
            CLUSTER_ROLE,
            &format!("tenant_id = {cluster_tenant}"),
        );
    }
    sql
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        m.get_connection()
            .execute_unprepared(&up_statements().join(";\n"))
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let mut sql = Vec::new();
        for table in WALLED {
            for role in [TENANT_ROLE, CLUSTER_ROLE] {
                sql.push(format!("DROP POLICY IF EXISTS {role}_wall ON {table}"));
            }
            sql.push(format!("ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"));
            sql.push(format!(
                "REVOKE ALL ON {table} FROM {TENANT_ROLE}, {CLUSTER_ROLE}"
            ));
        }
        sql.push(format!("REVOKE ALL ON users FROM {TENANT_ROLE}"));
        // The roles stay: other databases of the same server may use them.
        m.get_connection()
            .execute_unprepared(&sql.join(";\n"))
            .await?;
        Ok(())
    }
}
