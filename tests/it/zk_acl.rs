//! The coordination tree against a tenant who controls a worker host (issue: per-cluster
//! ZooKeeper identities). API, scheduler and two tenants' workers on Postgres and the
//! real ZooKeeper; the attacker holds tenant A's join token, so A's worker identity.

use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout;
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Access, CoordError, Coordinator, Credential, NodeKind, Op, Session};
use cloudtask_core::ids::{ClusterId, TaskId, WorkerId};
use cloudtask_worker::clock::SystemClock;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{Cluster, status};
use crate::support::PASSWORD;

const SECRET_A: &str = "sekrit-of-tenant-a-5f1c";
const SECRET_B: &str = "sekrit-of-tenant-b-9e2d";

/// What a worker of the cluster whose join token is `token` is handed at join, as a
/// session on the tree.
async fn worker_identity(cluster: &Cluster, token: &str) -> Arc<dyn Session> {
    let joined = cloudtask_worker::join(&cluster.api.url, token, &CancellationToken::new())
        .await
        .expect("join");
    let identity = joined
        .zookeeper
        .expect("a ZooKeeper identity with the join");
    let access = Access::cluster_worker(
        Credential::new(&identity.user, &identity.password).unwrap(),
        joined.cluster_id,
        &identity.owner_id,
    );
    ZkCoordinator::new(cluster.zookeeper.clone(), cluster.session_timeout)
        .with(access)
        .connect()
        .await
        .expect("connect as the worker")
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, CoordError>) {
    assert!(
        matches!(result, Err(CoordError::NoAuth(_))),
        "{what}: expected NoAuth, got {result:?}"
    );
}

/// Waits (bounded) until `read` gives something.
async fn eventually<T>(what: &str, mut read: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = read().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node of the tree with its data, read with the platform's identity.
async fn whole_tree(owner: &dyn Session) -> Vec<(String, Vec<u8>)> {
    let mut nodes = Vec::new();
    let mut stack = vec!["/".to_owned()];
    while let Some(path) = stack.pop() {
        let data = owner.get(&path).await.unwrap().map(|n| n.data);
        nodes.push((path.clone(), data.unwrap_or_default()));
        for child in owner.children(&path).await.unwrap_or_default() {
            stack.push(layout::join(&path, &child));
        }
    }
    nodes
}

#[tokio::test]
async fn a_tenants_worker_identity_reaches_its_own_cluster_only_and_no_env_is_in_the_tree() {
    let mut cluster = Cluster::start().await;
    let a: ClusterId = cluster.cluster_id.parse().unwrap();
    let other = cluster.api.tenant_with_cluster("globex", PASSWORD).await;
    let b: ClusterId = other.cluster_id.parse().unwrap();
    cluster.start_worker("wa");
    cluster.start_worker_of("wb", &other.join_token, Arc::new(SystemClock), |_| {});

    let task_a = cluster
        .create_task(json!({
            "name": "uses-a-secret",
            "schedule": "*/2 * * * * *",
            "command": "echo \"got $API_KEY\"",
            "env": [{ "name": "API_KEY", "value": SECRET_A }],
        }))
        .await;
    let created = other
        .owner
        .run(
            "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
            json!({ "input": {
                "clusterId": other.cluster_id,
                "name": "uses-b-secret",
                "schedule": "0 0 1 1 *",
                "command": "true",
                "env": [{ "name": "DB_PASSWORD", "value": SECRET_B }],
            } }),
        )
        .await;
    let task_b: TaskId = created.data()["createTask"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // A's worker still registers, gets its assignment, and runs its task with its env,
    // handed with the claim.
    let runs = cluster
        .runs_until(&task_a, "a run of A's task with its env", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    let ran = runs.iter().find(|r| status(r) == "SUCCEEDED").unwrap();
    assert_eq!(ran["logs"][0]["text"], format!("got {SECRET_A}"), "{ran}");
    let task_a: TaskId = task_a.parse().unwrap();

    let owner = cluster.observer().connect().await.unwrap();
    let (wa, wb): (WorkerId, WorkerId) = ("wa".parse().unwrap(), "wb".parse().unwrap());
    eventually("B's task mirrored and assigned", async || {
        owner
            .get(&layout::assignment(b, &wb, task_b))
            .await
            .unwrap()
    })
    .await;

    // The attacker: A's worker identity, from A's join token.
    let attacker = worker_identity(&cluster, &cluster.join_token).await;
    assert!(
        attacker
            .get(&layout::task(a, task_a))
            .await
            .unwrap()
            .is_some(),
        "A's identity reads A's tasks"
    );
    refused(
        "read B's task",
        attacker.get(&layout::task(b, task_b)).await,
    );
    refused("list B's tasks", attacker.children(&layout::tasks(b)).await);
    refused(
        "register a worker in B",
        attacker
            .create(
                &layout::worker(b, &"fake".parse().unwrap()),
                b"{}",
                NodeKind::Ephemeral,
            )
            .await,
    );
    refused(
        "delete B's worker",
        attacker.delete(&layout::worker(b, &wb), None).await,
    );
    for (cluster_id, worker, task) in [(a, &wa, task_a), (b, &wb, task_b)] {
        refused(
            "create an assignment",
            attacker
                .create(
                    &layout::assignment(cluster_id, worker, TaskId::new()),
                    b"{\"version\":1}",
                    NodeKind::Persistent,
                )
                .await,
        );
        refused(
            "rewrite an assignment",
            attacker
                .set(&layout::assignment(cluster_id, worker, task), b"{}", None)
                .await,
        );
        refused(
            "delete an assignment",
            attacker
                .delete(&layout::assignment(cluster_id, worker, task), None)
                .await,
        );
        let command = layout::encode(&layout::CommandNode::RunNow {
            task,
            run: cloudtask_core::ids::RunId::new(),
        });
        let commands = layout::commands(cluster_id, worker);
        let forged = if owner.get(&commands).await.unwrap().is_some() {
            attacker
                .create(
                    &layout::command_prefix(cluster_id, worker),
                    &command,
                    NodeKind::PersistentSequential,
                )
                .await
        } else {
            attacker.create(&commands, b"", NodeKind::Persistent).await
        };
        refused("write a command", forged);
    }
    let election = layout::by_sequence(owner.children(layout::ELECTION).await.unwrap());
    let leader = layout::join(layout::ELECTION, &election[0]);
    refused(
        "list the election",
        attacker.children(layout::ELECTION).await,
    );
    refused("read the leader", attacker.get(&leader).await);
    refused("delete the leader", attacker.delete(&leader, None).await);
    refused(
        "campaign",
        attacker
            .create(layout::ELECTION_PREFIX, b"", NodeKind::EphemeralSequential)
            .await,
    );
    refused(
        "a batch with B's assignment",
        attacker
            .multi(vec![Op::Delete {
                path: layout::assignment(b, &wb, task_b),
                version: None,
            }])
            .await,
    );

    // Anonymous: nothing useful.
    let stranger = ZkCoordinator::new(cluster.zookeeper.clone(), cluster.session_timeout)
        .connect()
        .await
        .unwrap();
    refused("anonymous list", stranger.children(layout::CLUSTERS).await);
    refused(
        "anonymous read",
        stranger.get(&layout::task(a, task_a)).await,
    );
    refused(
        "anonymous election",
        stranger.children(layout::ELECTION).await,
    );

    // No env value anywhere in the tree; the task nodes are there, without env.
    let tree = whole_tree(owner.as_ref()).await;
    assert!(
        tree.iter()
            .any(|(path, _)| *path == layout::task(b, task_b)),
        "the walk reaches B's task node"
    );
    for (path, data) in &tree {
        let text = String::from_utf8_lossy(data);
        for secret in [SECRET_A, SECRET_B] {
            assert!(!text.contains(secret), "{path} holds an env value: {text}");
        }
    }
    for session in [attacker, stranger, owner] {
        session.close().await;
    }
}

#[tokio::test]
async fn rotating_the_join_token_cuts_the_old_worker_identity_off() {
    let cluster = Cluster::start().await;
    let a: ClusterId = cluster.cluster_id.parse().unwrap();
    let task = cluster
        .create_task(json!({ "name": "t", "schedule": "0 0 1 1 *", "command": "true" }))
        .await;
    let task: TaskId = task.parse().unwrap();
    let owner = cluster.observer().connect().await.unwrap();
    eventually("the task mirrored", async || {
        owner.get(&layout::task(a, task)).await.unwrap()
    })
    .await;
    let old = worker_identity(&cluster, &cluster.join_token).await;
    assert!(old.get(&layout::task(a, task)).await.unwrap().is_some());

    let rotated = cluster
        .owner
        .run(
            "mutation($id: ID!) { rotateClusterToken(id: $id) { joinToken } }",
            json!({ "id": cluster.cluster_id }),
        )
        .await;
    let token = rotated.data()["rotateClusterToken"]["joinToken"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the old identity refused", async || {
        match old.get(&layout::task(a, task)).await {
            Err(CoordError::NoAuth(_)) => Some(()),
            _ => None,
        }
    })
    .await;
    let new = worker_identity(&cluster, &token).await;
    assert!(new.get(&layout::task(a, task)).await.unwrap().is_some());
    for session in [old, new, owner] {
        session.close().await;
    }
}
