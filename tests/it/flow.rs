//! The whole flow a user goes through, over HTTP.

use cloudtask_core::archive::samples;
use serde_json::json;

use crate::support::{CREATE_TASK, PASSWORD, World, task_input};

#[tokio::test]
async fn tenants_clusters_tasks_and_packages_end_to_end() {
    let world = World::new().await;
    let owner = &world.a.owner;

    // The owner sees their tenant, cluster and task.
    let me = owner
        .run(
            "{ me { email memberships { role tenant { id name } } } }",
            json!({}),
        )
        .await;
    assert_eq!(me.data()["me"]["memberships"][0]["role"], "OWNER");
    assert_eq!(me.data()["me"]["memberships"][0]["tenant"]["name"], "alpha");

    // Update: a spec change is a new version; a rename is not.
    let task_id = &world.a.task_id;
    let updated = owner
        .run(
            "mutation($id: ID!) { updateTask(id: $id, input: { schedule: \"0 * * * *\", command: \"echo v2\" }) { version schedule command } }",
            json!({ "id": task_id }),
        )
        .await;
    assert_eq!(updated.data()["updateTask"]["version"], 2);
    let renamed = owner
        .run(
            "mutation($id: ID!) { updateTask(id: $id, input: { name: \"renamed\" }) { version name } }",
            json!({ "id": task_id }),
        )
        .await;
    assert_eq!(renamed.data()["updateTask"]["version"], 2);
    assert_eq!(renamed.data()["updateTask"]["name"], "renamed");
    let history = owner
        .run(
            "query($id: ID!) { task(id: $id) { versions { version spec { schedule command } } } }",
            json!({ "id": task_id }),
        )
        .await;
    let versions = history.data()["task"]["versions"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["version"], 2);
    assert_eq!(versions[1]["spec"]["schedule"], "*/5 * * * *");
    assert_eq!(versions[1]["spec"]["command"], "echo hello");

    // Pause, resume.
    let paused = owner
        .run(
            "mutation($id: ID!) { pauseTask(id: $id) { state version } }",
            json!({ "id": task_id }),
        )
        .await;
    assert_eq!(paused.data()["pauseTask"]["state"], "PAUSED");
    let resumed = owner
        .run(
            "mutation($id: ID!) { resumeTask(id: $id) { state } }",
            json!({ "id": task_id }),
        )
        .await;
    assert_eq!(resumed.data()["resumeTask"]["state"], "ACTIVE");

    // Next fire times follow the schedule: on the hour.
    let next = owner
        .run(
            "query($id: ID!) { task(id: $id) { nextFireTimes(count: 3) } }",
            json!({ "id": task_id }),
        )
        .await;
    let times = next.data()["task"]["nextFireTimes"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(times.len(), 3);
    for t in &times {
        let t = chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap()).unwrap();
        assert_eq!(t.timestamp() % 3600, 0, "{t} is on the hour");
    }

    // Clone, then delete the clone.
    let cloned = owner
        .run(
            "mutation($id: ID!) { cloneTask(id: $id, name: \"copy\") { id name version command } }",
            json!({ "id": task_id }),
        )
        .await;
    assert_eq!(cloned.data()["cloneTask"]["version"], 1);
    assert_eq!(cloned.data()["cloneTask"]["command"], "echo v2");
    let clone_id = cloned.data()["cloneTask"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deleted = owner
        .run(
            "mutation($id: ID!) { deleteTask(id: $id) }",
            json!({ "id": clone_id }),
        )
        .await;
    assert_eq!(deleted.data()["deleteTask"], true);
    let gone = owner
        .run(
            "query($id: ID!) { task(id: $id) { id } }",
            json!({ "id": clone_id }),
        )
        .await;
    assert_eq!(gone.expect_code(), "NOT_FOUND");

    // A package uploaded with a new task, then fetched back byte for byte.
    let archive = samples::tar_gz_of(&[("run.sh", b"#!/bin/sh\necho packaged\n", 0o755)]);
    let mut input = task_input(&world.a.cluster_id, "packaged");
    input["package"] = serde_json::Value::Null;
    let created = owner
        .upload(
            CREATE_TASK,
            json!({ "input": input }),
            vec![("variables.input.package", "job.tar.gz", archive.clone())],
        )
        .await;
    let sha = created.data()["createTask"]["package"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let fetched = owner
        .http
        .get(format!("{}/packages/{sha}", world.api.url))
        .bearer_auth(owner.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().to_vec(), archive);

    // uploadPackage on an existing task is a new version pointing at the new archive.
    let zip = samples::zip_of(&[("main.py", b"print('hi')\n", 0o644)]);
    let uploaded = owner
        .upload(
            "mutation($id: ID!, $file: Upload!) { uploadPackage(taskId: $id, file: $file) { version package { sha256 format entries } } }",
            json!({ "id": task_id, "file": null }),
            vec![("variables.file", "job.zip", zip)],
        )
        .await;
    assert_eq!(uploaded.data()["uploadPackage"]["version"], 3);
    assert_eq!(uploaded.data()["uploadPackage"]["package"]["format"], "zip");

    // A worker of the cluster joins with the token and downloads the package by hash.
    let join = owner
        .http
        .post(format!("{}/worker/join", world.api.url))
        .json(&json!({ "token": world.a.join_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(join.status(), 200);
    let credential = join.json::<serde_json::Value>().await.unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned();
    let download = owner
        .http
        .get(format!("{}/worker/packages/{sha}", world.api.url))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().to_vec(), archive);

    // Tenant B's owner logs in on their own and sees only their own task.
    let b = world.api.login(&world.b.owner_email, PASSWORD, None).await;
    let tasks = b
        .run("{ tasks(first: 10) { edges { node { id } } } }", json!({}))
        .await;
    let ids: Vec<_> = tasks.data()["tasks"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![world.b.task_id.clone()]);

    // The audit log recorded the owner's mutations.
    let audit = owner
        .run(
            "{ auditLog(first: 50) { edges { node { operation } } } }",
            json!({}),
        )
        .await;
    let operations: Vec<_> = audit.data()["auditLog"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["operation"].as_str().unwrap().to_owned())
        .collect();
    for op in [
        "createCluster",
        "createTask",
        "updateTask",
        "pauseTask",
        "resumeTask",
        "cloneTask",
        "deleteTask",
        "uploadPackage",
    ] {
        assert!(
            operations.iter().any(|o| o == op),
            "{op} audited: {operations:?}"
        );
    }
}

#[tokio::test]
async fn the_schema_uses_the_designs_names_for_roots_and_filters() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let roots = owner
        .run(
            "{ __schema { queryType { name } mutationType { name } subscriptionType { name } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        roots.data()["__schema"],
        json!({
            "queryType": { "name": "Query" },
            "mutationType": { "name": "Mutation" },
            "subscriptionType": { "name": "Subscription" },
        })
    );
    // Filters passed as variables of the design's input types.
    let listed = owner
        .run(
            "query($tasks: TaskFilter, $runs: RunFilter) {
               tasks(filter: $tasks) { edges { node { id } } }
               runs(filter: $runs) { edges { node { id } } }
             }",
            json!({
                "tasks": { "nameContains": "" },
                "runs": { "taskId": world.a.task_id, "status": "SUCCEEDED" },
            }),
        )
        .await;
    let tasks = listed.data()["tasks"]["edges"].as_array().unwrap();
    assert!(
        tasks
            .iter()
            .any(|t| t["node"]["id"] == world.a.task_id.as_str()),
        "{}",
        listed.body
    );
    assert_eq!(listed.data()["runs"]["edges"], json!([]));
}
