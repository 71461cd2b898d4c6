//! Row-level security is a second wall under the scoped handles (Postgres): a query
//! with no filter at all, run inside a handle's transaction, still sees only the rows
//! of the handle's tenant or cluster. The tests' database user is a superuser that owns
//! the tables, so this also shows the handle leaves the owner role.

use cloudtask_catalogue::{Catalogue, ClusterHandle, NewTask, TenantHandle};
use cloudtask_core::protocol::Claim;
use cloudtask_core::run::{RunStatus, RunTrigger};
use cloudtask_core::task::{TaskSpec, TaskState};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

struct Tenant {
    handle: TenantHandle,
    clusters: Vec<ClusterHandle>,
}

/// A tenant named `name` with one cluster per entry of `clusters`, each holding one task
/// named `<cluster>-task` and one claimed run of it.
async fn tenant(catalogue: &Catalogue, name: &str, clusters: &[&str]) -> Tenant {
    let (_, handle) = cloudtask_testkit::owned_tenant(catalogue, name).await;
    let mut handles = Vec::new();
    for cluster_name in clusters {
        let token = format!("{name}-{cluster_name}-token");
        let cluster = handle.create_cluster(cluster_name, token).await.unwrap();
        let task = handle
            .create_task(
                NewTask {
                    cluster_id: cluster.id,
                    name: format!("{cluster_name}-task"),
                    description: String::new(),
                    state: TaskState::Active,
                    spec: TaskSpec::new("0 3 * * *", "echo hi"),
                },
                None,
            )
            .await
            .unwrap();
        let cluster = catalogue.cluster(cluster.id);
        cluster
            .claim_run(&Claim {
                task_id: task.id,
                scheduled_at: chrono::Utc::now(),
                attempt: 0,
                task_version: 1,
                worker: "w1".parse().unwrap(),
                trigger: RunTrigger::Schedule,
                status: RunStatus::Skipped,
                reason: Some("recorded by a test".into()),
            })
            .await
            .unwrap();
        handles.push(cluster);
    }
    Tenant {
        handle,
        clusters: handles,
    }
}

async fn catalogue() -> Catalogue {
    let catalogue = Catalogue::connect(&cloudtask_testkit::fresh_database().await)
        .await
        .unwrap();
    catalogue.migrate().await.unwrap();
    catalogue
}

const TASK_NAMES: &str = "SELECT name FROM tasks ORDER BY name";
const RUN_TASK_NAMES: &str =
    "SELECT t.name FROM runs r JOIN tasks t ON t.id = r.task_id ORDER BY t.name";

#[tokio::test]
async fn an_unfiltered_query_through_a_tenant_handle_sees_only_that_tenant() {
    let catalogue = catalogue().await;
    let acme = tenant(&catalogue, "acme", &["a1", "a2"]).await;
    let globex = tenant(&catalogue, "globex", &["g1"]).await;

    // The owner role sees everything: the wall below is the handle's doing.
    let all = catalogue
        .connection()
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            TASK_NAMES,
        ))
        .await
        .unwrap();
    assert_eq!(all.len(), 3);

    assert_eq!(
        acme.handle.unfiltered_query(TASK_NAMES).await.unwrap(),
        ["a1-task", "a2-task"]
    );
    assert_eq!(
        globex.handle.unfiltered_query(TASK_NAMES).await.unwrap(),
        ["g1-task"]
    );
    assert_eq!(
        acme.handle.unfiltered_query(RUN_TASK_NAMES).await.unwrap(),
        ["a1-task", "a2-task"]
    );
    assert_eq!(
        globex
            .handle
            .unfiltered_query("SELECT name FROM tenants")
            .await
            .unwrap(),
        ["globex"]
    );
    // Writes are walled too: another tenant's rows are not there to change.
    assert!(
        acme.handle
            .unfiltered_query("UPDATE tasks SET description = 'x' RETURNING name")
            .await
            .unwrap()
            .len()
            == 2
    );
    assert!(
        acme.handle
            .unfiltered_query("DELETE FROM clusters WHERE name = 'g1' RETURNING name")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_unfiltered_query_through_a_cluster_handle_sees_only_that_cluster() {
    let catalogue = catalogue().await;
    let acme = tenant(&catalogue, "acme", &["a1", "a2"]).await;
    let globex = tenant(&catalogue, "globex", &["g1"]).await;

    let a1 = &acme.clusters[0];
    assert_eq!(a1.unfiltered_query(TASK_NAMES).await.unwrap(), ["a1-task"]);
    assert_eq!(
        a1.unfiltered_query(RUN_TASK_NAMES).await.unwrap(),
        ["a1-task"]
    );
    assert_eq!(
        a1.unfiltered_query("SELECT name FROM clusters")
            .await
            .unwrap(),
        ["a1"]
    );
    assert_eq!(
        a1.unfiltered_query("SELECT name FROM tenants")
            .await
            .unwrap(),
        ["acme"]
    );
    let g1 = &globex.clusters[0];
    assert_eq!(g1.unfiltered_query(TASK_NAMES).await.unwrap(), ["g1-task"]);
    // What the worker role was not granted at all is refused outright.
    assert!(
        g1.unfiltered_query("SELECT email FROM users")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_handles_work_behind_the_wall_on_a_second_database_of_the_same_server() {
    // Roles are server-wide: a second database migrates and walls alike.
    for _ in 0..2 {
        let catalogue = catalogue().await;
        let acme = tenant(&catalogue, "acme", &["a1"]).await;
        assert_eq!(
            acme.handle.unfiltered_query(TASK_NAMES).await.unwrap(),
            ["a1-task"]
        );
    }
}
