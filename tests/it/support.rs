//! Shared setup: a platform admin, two tenants each with an owner, a cluster and a task.

use cloudtask_testkit::{Gql, TestApi};
use serde_json::{Value, json};

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const PASSWORD: &str = "correct horse battery";

#[allow(dead_code)]
pub struct Tenant {
    pub id: String,
    pub owner_email: String,
    pub owner: Gql,
    pub cluster_id: String,
    pub join_token: String,
    pub task_id: String,
}

#[allow(dead_code)]
pub struct World {
    pub api: TestApi,
    pub admin: Gql,
    pub a: Tenant,
    pub b: Tenant,
}

pub const CREATE_TASK: &str = "mutation($input: CreateTaskInput!) {
    createTask(input: $input) { id name version state schedule command package { sha256 } }
}";

impl World {
    pub async fn new() -> World {
        World::with_config(|_| {}).await
    }

    /// A world whose API runs with `adjust`ed configuration.
    pub async fn with_config(adjust: impl FnOnce(&mut cloudtask_core::config::Config)) -> World {
        let api = TestApi::start_with(adjust).await;
        api.create_user(ADMIN_EMAIL, PASSWORD, true).await;
        let admin = api.login(ADMIN_EMAIL, PASSWORD, None).await;
        let a = Self::tenant(&api, &admin, "alpha").await;
        let b = Self::tenant(&api, &admin, "beta").await;
        World { api, admin, a, b }
    }

    async fn tenant(api: &TestApi, admin: &Gql, name: &str) -> Tenant {
        let owner_email = format!("owner@{name}.example");
        let created = admin
            .run(
                "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id name } }",
                json!({ "input": { "name": name, "ownerEmail": owner_email, "ownerPassword": PASSWORD } }),
            )
            .await;
        let id = created.data()["createTenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let owner = api.login(&owner_email, PASSWORD, Some(&id)).await;
        let cluster = owner
            .run(
                "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }",
                json!({ "n": format!("{name}-cluster") }),
            )
            .await;
        let cluster_id = cluster.data()["createCluster"]["cluster"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let join_token = cluster.data()["createCluster"]["joinToken"]
            .as_str()
            .unwrap()
            .to_owned();
        let task = owner
            .run(
                CREATE_TASK,
                json!({ "input": task_input(&cluster_id, &format!("{name}-task")) }),
            )
            .await;
        let task_id = task.data()["createTask"]["id"].as_str().unwrap().to_owned();
        Tenant {
            id,
            owner_email,
            owner,
            cluster_id,
            join_token,
            task_id,
        }
    }
}

pub fn task_input(cluster_id: &str, name: &str) -> Value {
    json!({
        "clusterId": cluster_id,
        "name": name,
        "schedule": "*/5 * * * *",
        "command": "echo hello",
    })
}

/// A finished run of one of the tenant's tasks, recorded as a worker would (a claim),
/// for tests that need a run to exist; returns its id.
#[allow(dead_code)]
pub async fn add_run(world: &World, cluster_id: &str, task_id: &str) -> String {
    use cloudtask_core::protocol::Claim;
    use cloudtask_core::run::{RunStatus, RunTrigger};
    let claim = Claim {
        task_id: task_id.parse().unwrap(),
        scheduled_at: chrono::Utc::now(),
        attempt: 0,
        task_version: 1,
        worker: "w1".parse().unwrap(),
        trigger: RunTrigger::Schedule,
        status: RunStatus::Skipped,
        reason: Some("recorded by a test".into()),
    };
    let run = world
        .api
        .catalogue
        .cluster(cluster_id.parse().unwrap())
        .claim_run(&claim)
        .await
        .unwrap();
    run.id.to_string()
}

/// The names of the first 50 tasks the client sees.
pub async fn task_names(owner: &Gql) -> Vec<String> {
    let answer = owner
        .run(
            "{ tasks(first: 50) { edges { node { name } } } }",
            json!({}),
        )
        .await;
    answer.data()["tasks"]["edges"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|e| e["node"]["name"].as_str().expect("a name").to_owned())
        .collect()
}
