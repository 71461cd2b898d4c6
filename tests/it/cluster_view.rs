//! Workers and assignments are visible in GraphQL, read from real ZooKeeper while a real
//! scheduler leader allocates.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{Coordinator, NodeKind};
use cloudtask_testkit::TestApi;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{CREATE_TASK, PASSWORD, task_input};

#[tokio::test]
async fn workers_and_assigned_worker_are_visible() {
    let zookeeper = cloudtask_testkit::fresh_zookeeper();
    let api = TestApi::start_with(|c| c.zookeeper = zookeeper.clone()).await;
    api.create_user("admin@example.com", PASSWORD, true).await;
    let admin = api.login("admin@example.com", PASSWORD, None).await;
    let tenant = admin
        .run(
            "mutation { createTenant(input: {name: \"t\", ownerEmail: \"o@example.com\", ownerPassword: \"correct horse battery\"}) { id } }",
            json!({}),
        )
        .await;
    let tenant_id = tenant.data()["createTenant"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let owner = api.login("o@example.com", PASSWORD, Some(&tenant_id)).await;
    let cluster = owner
        .run(
            "mutation { createCluster(name: \"c\") { cluster { id } } }",
            json!({}),
        )
        .await;
    let cluster_id = cluster.data()["createCluster"]["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = owner
        .run(
            CREATE_TASK,
            json!({ "input": task_input(&cluster_id, "job") }),
        )
        .await;
    let task_id = task.data()["createTask"]["id"].as_str().unwrap().to_owned();

    // No worker yet: the task is visibly unassigned.
    let query = "query($c: ID!, $t: ID!) {
        cluster(id: $c) { workers { name hostname online assignedTaskCount capacity } }
        task(id: $t) { assignedWorker { name } } }";
    let vars = json!({ "c": cluster_id, "t": task_id });
    let empty = owner.run(query, vars.clone()).await;
    assert_eq!(empty.data()["cluster"]["workers"], json!([]));
    assert_eq!(empty.data()["task"]["assignedWorker"], json!(null));

    let coordinator = crate::harness::owner_coordinator(&zookeeper, Duration::from_secs(4));
    let shutdown = CancellationToken::new();
    let scheduler = cloudtask_scheduler::Scheduler {
        catalogue: api.catalogue.clone(),
        coordinator: Arc::new(coordinator.clone()),
        identity: "test".into(),
        sweep: Duration::from_secs(3600),
        writes: Arc::default(),
        notifier: None,
        pruning: None,
    };
    tokio::spawn(scheduler.run(shutdown.clone()));
    let worker = coordinator.connect().await.unwrap();
    let cluster_uuid: cloudtask_core::ids::ClusterId = cluster_id.parse().unwrap();
    worker
        .ensure_path(&layout::workers(cluster_uuid))
        .await
        .unwrap();
    let node = WorkerNode {
        name: "w1".parse().unwrap(),
        hostname: "box-1".into(),
        version: "0.1.0".into(),
        capacity: 2,
        labels: BTreeSet::new(),
        started_at: Utc::now(),
        containment: String::new(),
    };
    worker
        .create(
            &layout::worker(cluster_uuid, &"w1".parse().unwrap()),
            &layout::encode(&node),
            NodeKind::Ephemeral,
        )
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = owner.run(query, vars.clone()).await;
        // The two fields are read one after the other: the assignment may land between.
        if seen.data()["task"]["assignedWorker"]["name"] == "w1"
            && seen.data()["cluster"]["workers"]
                == json!([{ "name": "w1", "hostname": "box-1", "online": true, "assignedTaskCount": 1, "capacity": 2 }])
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never assigned: {}",
            seen.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Another tenant cannot look at this cluster's workers.
    let other = api.login("admin@example.com", PASSWORD, None).await;
    let denied = other.run(query, vars).await;
    assert!(denied.code().is_some());
    shutdown.cancel();
}
