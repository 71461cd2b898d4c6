//! Firing end to end on real services: the API on a fresh Postgres database, a scheduler
//! and a worker on a fresh ZooKeeper chroot, real `sh` processes.

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_testkit::{Gql, TestApi};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{ADMIN_EMAIL, PASSWORD};

const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// API, scheduler and one worker for one tenant's cluster.
struct Cluster {
    api: TestApi,
    owner: Gql,
    cluster_id: String,
    zookeeper: String,
    join_token: String,
    _data: tempfile::TempDir,
    stops: Vec<CancellationToken>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
    }
}

impl Cluster {
    async fn start() -> Cluster {
        let zookeeper = cloudtask_testkit::fresh_zookeeper();
        let zk = zookeeper.clone();
        let api = TestApi::start_with(move |c| {
            c.zookeeper = zk;
            c.zookeeper_session_timeout_ms = SESSION_TIMEOUT.as_millis() as u64;
        })
        .await;
        api.create_user(ADMIN_EMAIL, PASSWORD, true).await;
        let admin = api.login(ADMIN_EMAIL, PASSWORD, None).await;
        let created = admin
            .run(
                "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
                json!({ "input": { "name": "acme", "ownerEmail": "owner@acme.example", "ownerPassword": PASSWORD } }),
            )
            .await;
        let tenant = created.data()["createTenant"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let owner = api
            .login("owner@acme.example", PASSWORD, Some(&tenant))
            .await;
        let cluster = owner
            .run(
                "mutation { createCluster(name: \"main\") { cluster { id } joinToken } }",
                json!({}),
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

        let scheduler_stop = CancellationToken::new();
        let scheduler = cloudtask_scheduler::Scheduler {
            catalogue: api.catalogue.clone(),
            coordinator: std::sync::Arc::new(ZkCoordinator::new(
                zookeeper.clone(),
                SESSION_TIMEOUT,
            )),
            identity: "test-scheduler".into(),
            sweep: Duration::from_secs(3600),
            writes: Default::default(),
        };
        tokio::spawn(scheduler.run(scheduler_stop.clone()));
        Cluster {
            api,
            owner,
            cluster_id,
            zookeeper,
            join_token,
            _data: tempfile::tempdir().unwrap(),
            stops: vec![scheduler_stop],
        }
    }

    /// Starts a worker in this process, as `cloudtask worker` would run.
    fn start_worker(&mut self, name: &str) -> CancellationToken {
        let mut config = cloudtask_testkit::test_config(String::new());
        config.api_url = self.api.url.clone();
        config.zookeeper = self.zookeeper.clone();
        config.zookeeper_session_timeout_ms = SESSION_TIMEOUT.as_millis() as u64;
        config.cluster_token = Some(self.join_token.clone());
        config.worker_name = Some(name.into());
        config.data_dir = self._data.path().join(name);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move { cloudtask_worker::run(&config, token).await });
        self.stops.push(stop.clone());
        stop
    }

    async fn create_task(&self, input: Value) -> String {
        let mut input = input;
        input["clusterId"] = json!(self.cluster_id);
        let created = self
            .owner
            .run(
                "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
                json!({ "input": input }),
            )
            .await;
        created.data()["createTask"]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn runs(&self, task: &str) -> Vec<Value> {
        let response = self
            .owner
            .run(
                "query($task: ID!) { runs(first: 200, filter: { taskId: $task }) { edges { node {
                    id scheduledAt startedAt finishedAt status trigger attempt exitCode error worker
                    logs { offset stream text }
                } } } }",
                json!({ "task": task }),
            )
            .await;
        let mut runs: Vec<Value> = response.data()["runs"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"].clone())
            .collect();
        runs.sort_by_key(|r| (at(r, "scheduledAt"), r["attempt"].as_u64()));
        runs
    }

    /// Polls the API (bounded) until `done` holds for the task's runs.
    async fn runs_until(
        &self,
        task: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let runs = self.runs(task).await;
            if done(&runs) {
                return runs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {runs:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn at(run: &Value, field: &str) -> DateTime<Utc> {
    run[field].as_str().unwrap().parse().unwrap()
}

fn status(run: &Value) -> &str {
    run["status"].as_str().unwrap()
}

#[tokio::test]
async fn a_task_firing_every_second_runs_once_per_second_with_its_logs() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({
            "name": "every-second",
            "schedule": "* * * * * *",
            "command": "echo \"out $CLOUDTASK_SCHEDULED_AT $CLOUDTASK_ATTEMPT\"; echo err >&2; echo done",
        }))
        .await;

    // Ten seconds of firing after the first run that started on time.
    let runs = cluster
        .runs_until(&task, "ten seconds of runs", |runs| {
            let first = runs.iter().find(|r| status(r) != "SKIPPED");
            first.is_some_and(|first| {
                let start = at(first, "scheduledAt");
                runs.iter()
                    .filter(|r| at(r, "scheduledAt") >= start + chrono::Duration::seconds(11))
                    .count()
                    > 0
            })
        })
        .await;
    let paused = cluster
        .owner
        .run(
            "mutation($id: ID!) { pauseTask(id: $id) { state } }",
            json!({ "id": task }),
        )
        .await;
    assert_eq!(paused.data()["pauseTask"]["state"], "PAUSED");
    let runs = {
        let _ = runs;
        cluster
            .runs_until(&task, "every run to finish", |runs| {
                runs.iter()
                    .all(|r| !matches!(status(r), "RUNNING" | "QUEUED"))
            })
            .await
    };

    let first = runs.iter().position(|r| status(r) != "SKIPPED").unwrap();
    // Fires before the worker took the new task over are accounted as misfires.
    for skipped in &runs[..first] {
        assert!(
            skipped["error"].as_str().unwrap().contains("misfire"),
            "{skipped}"
        );
    }
    let start = at(&runs[first], "scheduledAt");
    let window: Vec<&Value> = runs
        .iter()
        .filter(|r| {
            let t = at(r, "scheduledAt");
            t >= start && t < start + chrono::Duration::seconds(10)
        })
        .collect();
    assert!(
        (9..=11).contains(&window.len()),
        "{} runs in 10 s: {window:#?}",
        window.len()
    );
    let mut previous: Option<DateTime<Utc>> = None;
    for run in &window {
        let scheduled = at(run, "scheduledAt");
        assert_eq!(scheduled.nanosecond(), 0, "fires on the second: {run}");
        if let Some(previous) = previous {
            assert_eq!(
                scheduled - previous,
                chrono::Duration::seconds(1),
                "one run per second"
            );
        }
        previous = Some(scheduled);
        assert_eq!(status(run), "SUCCEEDED", "{run}");
        assert_eq!(run["exitCode"], 0);
        assert_eq!(run["trigger"], "SCHEDULE");
        assert_eq!(run["worker"], "w1");
        assert!(at(run, "startedAt") >= scheduled);
        let logs = run["logs"].as_array().unwrap();
        let offsets: Vec<u64> = logs.iter().map(|l| l["offset"].as_u64().unwrap()).collect();
        assert_eq!(
            offsets,
            (0..logs.len() as u64).collect::<Vec<_>>(),
            "offsets in order: {run}"
        );
        let stdout: Vec<&str> = logs
            .iter()
            .filter(|l| l["stream"] == "STDOUT")
            .map(|l| l["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            stdout,
            [format!("out {} 0", scheduled.to_rfc3339()).as_str(), "done"]
        );
        assert!(
            logs.iter()
                .any(|l| l["stream"] == "STDERR" && l["text"] == "err")
        );
    }
    // Whatever else happened, no fire ran twice (the catalogue's unique key) and every
    // fire since the first has a record.
    let mut fires: Vec<DateTime<Utc>> = runs.iter().map(|r| at(r, "scheduledAt")).collect();
    let total = fires.len();
    fires.dedup();
    assert_eq!(fires.len(), total, "a fire recorded twice");
    for pair in fires[first..].windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "a fire unaccounted for"
        );
    }
}
