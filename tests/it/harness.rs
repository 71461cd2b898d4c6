//! The harness of the end-to-end tests: the API on a fresh Postgres database, a scheduler
//! and workers on a fresh ZooKeeper chroot, real `sh` processes; workers in this process
//! or as `cloudtask worker` processes, schedulers in this process or as processes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_testkit::{Gql, Proxy, TestApi};
use cloudtask_worker::clock::{Clock, SystemClock};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::PASSWORD;

pub const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// The platform's identity on `zookeeper` (the tests' `zookeeper_auth`).
pub fn owner_coordinator(zookeeper: &str, session_timeout: Duration) -> ZkCoordinator {
    let credential = cloudtask_coord::Credential::parse(cloudtask_testkit::test_zookeeper_auth())
        .expect("the test credential");
    ZkCoordinator::new(zookeeper, session_timeout).with(cloudtask_coord::Access::owner(credential))
}

/// How a test wants its cluster.
pub struct Options {
    /// The ZooKeeper connect string (with a chroot); default: a fresh chroot on the
    /// suite's server.
    pub zookeeper: Option<String>,
    /// `zookeeper_tls_ca` for everyone (API, schedulers, workers): the CA of a
    /// `tcp+tls://` `zookeeper`.
    pub zookeeper_tls_ca: Option<std::path::PathBuf>,
    pub session_timeout: Duration,
    /// Run a scheduler in this process (the usual case).
    pub in_process_scheduler: bool,
    /// Notification settings for the schedulers (`CLOUDTASK_*` names without the prefix,
    /// lower-case): `smtp_url`, `notify_digest_window_secs`, `webhook_allow_networks`
    /// (for the API too)…
    pub notify: Vec<(&'static str, String)>,
    /// `queue_expiry_secs` (default: the configuration's).
    pub queue_expiry_secs: Option<u64>,
    /// How the in-process scheduler prunes while it leads (default: it does not).
    pub pruning: Option<cloudtask_scheduler::retention::Pruning>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            zookeeper: None,
            zookeeper_tls_ca: None,
            session_timeout: SESSION_TIMEOUT,
            in_process_scheduler: true,
            notify: Vec::new(),
            queue_expiry_secs: None,
            pruning: None,
        }
    }
}

/// API, scheduler and one worker for one tenant's cluster.
pub struct Cluster {
    /// Serves until dropped.
    pub api: TestApi,
    pub owner: Gql,
    pub cluster_id: String,
    pub zookeeper: String,
    pub zookeeper_tls_ca: Option<std::path::PathBuf>,
    pub session_timeout: Duration,
    pub join_token: String,
    /// Workers reach the API through this proxy, so a test can cut them off from it.
    pub api_proxy: Proxy,
    pub data: tempfile::TempDir,
    /// The workers' `run_dir`: beside `data`, open to the run users (0711).
    pub runs: tempfile::TempDir,
    pub stops: Vec<CancellationToken>,
    pub processes: Vec<std::process::Child>,
    pub notify: Vec<(&'static str, String)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
        for process in &mut self.processes {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Cluster {
        let zookeeper = options
            .zookeeper
            .clone()
            .unwrap_or_else(cloudtask_testkit::fresh_zookeeper);
        let session_timeout = options.session_timeout;
        let zk = zookeeper.clone();
        let tls_ca = options.zookeeper_tls_ca.clone();
        // The outbound policy binds the API (when a webhook is set) and the sender alike.
        let allow = options
            .notify
            .iter()
            .find(|(k, _)| *k == "webhook_allow_networks")
            .map(|(_, v)| v.clone());
        let queue_expiry_secs = options.queue_expiry_secs;
        let api = TestApi::start_with(move |c| {
            if let Some(secs) = queue_expiry_secs {
                c.queue_expiry_secs = secs;
            }
            c.zookeeper = zk;
            c.zookeeper_tls_ca = tls_ca;
            c.zookeeper_session_timeout_ms = session_timeout.as_millis() as u64;
            if let Some(allow) = allow {
                c.webhook_allow_networks = allow;
            }
        })
        .await;
        let api_proxy = Proxy::start(api.url.trim_start_matches("http://")).await;
        let setup = api.tenant_with_cluster("acme", PASSWORD).await;
        let (owner, cluster_id, join_token) = (setup.owner, setup.cluster_id, setup.join_token);

        let scheduler_stop = CancellationToken::new();
        let mut notify_config = (*api.state.config).clone();
        for (key, value) in &options.notify {
            match *key {
                "smtp_url" => notify_config.smtp_url = Some(value.clone()),
                "smtp_timeout_secs" => notify_config.smtp_timeout_secs = value.parse().unwrap(),
                "notify_digest_window_secs" => {
                    notify_config.notify_digest_window_secs = value.parse().unwrap()
                }
                "webhook_allow_networks" => notify_config.webhook_allow_networks = value.clone(),
                other => panic!("no notify setting {other}"),
            }
        }
        if options.in_process_scheduler {
            let scheduler = cloudtask_scheduler::Scheduler {
                catalogue: api.catalogue.clone(),
                coordinator: std::sync::Arc::new(
                    owner_coordinator(&zookeeper, session_timeout)
                        .with_tls_ca(read_ca(&options.zookeeper_tls_ca)),
                ),
                identity: "test-scheduler".into(),
                sweep: Duration::from_secs(3600),
                writes: Default::default(),
                notifier: Some(
                    cloudtask_scheduler::notify::Notifier::new(
                        api.catalogue.clone(),
                        &notify_config,
                    )
                    .expect("notifier settings"),
                ),
                pruning: options.pruning.clone(),
            };
            tokio::spawn(scheduler.run(scheduler_stop.clone()));
        }
        Cluster {
            api,
            session_timeout,
            owner,
            cluster_id,
            zookeeper,
            zookeeper_tls_ca: options.zookeeper_tls_ca,
            join_token,
            api_proxy,
            data: tempfile::tempdir().unwrap(),
            runs: run_dir(),
            stops: vec![scheduler_stop],
            processes: Vec::new(),
            notify: options.notify,
        }
    }

    /// A coordinator with the platform's identity, to look at the tree as the scheduler
    /// does.
    pub fn observer(&self) -> ZkCoordinator {
        owner_coordinator(&self.zookeeper, self.session_timeout)
            .with_tls_ca(read_ca(&self.zookeeper_tls_ca))
    }

    pub fn worker_api_url(&self) -> String {
        format!("http://{}", self.api_proxy.addr)
    }

    /// Starts `cloudtask worker` as a process of its own; returns its index in
    /// `processes`.
    pub fn spawn_worker_process(&mut self, name: &str) -> usize {
        let zookeeper = self.zookeeper.clone();
        self.spawn_worker_process_via(name, &zookeeper)
    }

    /// [`Cluster::spawn_worker_process`] with its own ZooKeeper connect string (a proxy).
    pub fn spawn_worker_process_via(&mut self, name: &str, zookeeper: &str) -> usize {
        let token = self.join_token.clone();
        self.spawn_worker_process_for(name, zookeeper, &token)
    }

    /// [`Cluster::spawn_worker_process_via`] for the cluster of `join_token` (another
    /// tenant's, say).
    pub fn spawn_worker_process_for(
        &mut self,
        name: &str,
        zookeeper: &str,
        join_token: &str,
    ) -> usize {
        let dir = self.data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("worker.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cloudtask"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CLOUDTASK_API_URL", self.worker_api_url())
            .env("CLOUDTASK_ZOOKEEPER", zookeeper)
            .envs(tls_ca_env(&self.zookeeper_tls_ca))
            .env(
                "CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT_MS",
                self.session_timeout.as_millis().to_string(),
            )
            .env("CLOUDTASK_CLUSTER_TOKEN", join_token)
            .env("CLOUDTASK_WORKER_NAME", name)
            .env("CLOUDTASK_DATA_DIR", &dir)
            .env("CLOUDTASK_RUN_DIR", self.runs.path())
            .env("CLOUDTASK_LOG_LEVEL", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the worker binary");
        self.processes.push(child);
        self.processes.len() - 1
    }

    /// Starts `cloudtask scheduler` as a process of its own; returns its index in
    /// `processes`.
    pub fn spawn_scheduler_process(&mut self, name: &str) -> usize {
        let dir = self.data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("scheduler.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cloudtask"))
            .arg("scheduler")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "CLOUDTASK_DATABASE_URL",
                &self.api.state.config.database_url,
            )
            .env("CLOUDTASK_ZOOKEEPER", &self.zookeeper)
            .envs(tls_ca_env(&self.zookeeper_tls_ca))
            .env(
                "CLOUDTASK_ZOOKEEPER_AUTH",
                cloudtask_testkit::test_zookeeper_auth(),
            )
            .env(
                "CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT_MS",
                self.session_timeout.as_millis().to_string(),
            )
            .env("CLOUDTASK_LOG_LEVEL", "info")
            .envs(
                self.notify
                    .iter()
                    .map(|(k, v)| (format!("CLOUDTASK_{}", k.to_uppercase()), v)),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the scheduler binary");
        self.processes.push(child);
        self.processes.len() - 1
    }

    /// Starts a worker in this process, as `cloudtask worker` would run.
    pub fn start_worker(&mut self, name: &str) -> CancellationToken {
        self.start_worker_with_clock(name, std::sync::Arc::new(SystemClock))
    }

    pub fn start_worker_with_clock(
        &mut self,
        name: &str,
        clock: std::sync::Arc<dyn Clock>,
    ) -> CancellationToken {
        let token = self.join_token.clone();
        self.start_worker_of(name, &token, clock, |_| {})
    }

    /// [`Cluster::start_worker`] with its configuration adjusted (limits and the like).
    pub fn start_worker_with(
        &mut self,
        name: &str,
        clock: std::sync::Arc<dyn Clock>,
        adjust: impl FnOnce(&mut cloudtask_core::config::Config),
    ) -> CancellationToken {
        let token = self.join_token.clone();
        self.start_worker_of(name, &token, clock, adjust)
    }

    /// A worker in this process for the cluster whose join token is `join_token` (another
    /// tenant's, say), with its configuration adjusted by `adjust`.
    pub fn start_worker_of(
        &mut self,
        name: &str,
        join_token: &str,
        clock: std::sync::Arc<dyn Clock>,
        adjust: impl FnOnce(&mut cloudtask_core::config::Config),
    ) -> CancellationToken {
        let mut config = cloudtask_testkit::test_config(String::new());
        config.api_url = self.worker_api_url();
        config.run_kill_grace_secs = 1;
        config.zookeeper = self.zookeeper.clone();
        config.zookeeper_tls_ca = self.zookeeper_tls_ca.clone();
        config.zookeeper_session_timeout_ms = self.session_timeout.as_millis() as u64;
        config.cluster_token = Some(join_token.to_owned());
        // A worker never holds the platform's credential: its identity comes with the join.
        config.zookeeper_auth = None;
        config.worker_name = Some(name.into());
        config.data_dir = self.data.path().join(name);
        config.run_dir = Some(self.runs.path().to_owned());
        adjust(&mut config);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move { cloudtask_worker::run_with_clock(&config, clock, token).await });
        self.stops.push(stop.clone());
        stop
    }

    /// Where worker `name` of the cluster of `cluster_id` unpacks packages (a run's
    /// working folder is `packages/<sha256>`, or `packages/none`).
    pub fn packages_of(&self, cluster_id: &str, name: &str) -> std::path::PathBuf {
        self.runs
            .path()
            .join(cluster_id)
            .join(name)
            .join("packages")
    }

    pub async fn create_task(&self, input: Value) -> String {
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

    pub async fn runs(&self, task: &str) -> Vec<Value> {
        let response = self
            .owner
            .run(
                "query($task: ID!) { runs(first: 200, filter: { taskId: $task }) { edges { node {
                    id scheduledAt startedAt finishedAt status trigger attempt exitCode error worker
                    reason reasonMessage logs(limit: 1000) { offset stream text }
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
        // Every run that has ended says why, in every test that reads runs here.
        for run in &runs {
            if !matches!(status(run), "QUEUED" | "RUNNING") {
                assert!(
                    run["reason"].is_string() && run["reasonMessage"].is_string(),
                    "an ended run without a reason: {run:#}"
                );
            }
        }
        runs.sort_by_key(|r| (at(r, "scheduledAt"), r["attempt"].as_u64()));
        runs
    }

    pub async fn pause(&self, task: &str) {
        let paused = self
            .owner
            .run(
                "mutation($id: ID!) { pauseTask(id: $id) { state } }",
                json!({ "id": task }),
            )
            .await;
        assert_eq!(
            paused.data()["pauseTask"]["state"],
            "PAUSED",
            "{}",
            paused.body
        );
    }

    /// Pauses the task (firing every `period`) and waits for every run of it to end and
    /// every fire to have its record (skips are recorded asynchronously).
    pub async fn pause_and_settle(&self, task: &str, period: i64) -> Vec<Value> {
        self.pause(task).await;
        self.runs_until(
            task,
            "every run to end and every fire to be recorded",
            |runs| {
                runs.iter()
                    .all(|r| !matches!(status(r), "RUNNING" | "QUEUED"))
                    && ledger_counts(runs, chrono::Duration::seconds(period)).1 == 0
            },
        )
        .await
    }

    /// Waits (bounded) until the scheduler leads and has taken the cluster on (its
    /// znode exists): workers that join from now on are joins it sees.
    pub async fn wait_cluster_mirrored(&self) {
        use cloudtask_coord::Coordinator;
        let coordinator = self.observer();
        let session = coordinator.connect().await.expect("ZooKeeper");
        let path = cloudtask_coord::layout::cluster(self.cluster_id.parse().unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // Its payload is written once the leader has read the cluster's workers.
        while session
            .get(&path)
            .await
            .ok()
            .flatten()
            .is_none_or(|node| node.data.is_empty())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the scheduler never took the cluster on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        session.close().await;
    }

    /// Waits (bounded) until the scheduler has given the task to a worker.
    pub async fn wait_assigned(&self, task: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.assigned_worker(task).await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the task was never assigned"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `runTaskNow`; returns the queued run's id.
    pub async fn run_now(&self, task: &str) -> String {
        let queued = self
            .owner
            .run(
                "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
                json!({ "id": task }),
            )
            .await;
        queued.data()["runTaskNow"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", queued.body))
            .to_owned()
    }

    pub async fn assigned_worker(&self, task: &str) -> Option<String> {
        let response = self
            .owner
            .run(
                "query($id: ID!) { task(id: $id) { assignedWorker { name } } }",
                json!({ "id": task }),
            )
            .await;
        response.data()["task"]["assignedWorker"]["name"]
            .as_str()
            .map(str::to_owned)
    }

    /// Polls the API (bounded) until `done` holds for the task's runs.
    pub async fn runs_until(
        &self,
        task: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
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

/// The PEM text of a `zookeeper_tls_ca` file.
pub fn read_ca(path: &Option<std::path::PathBuf>) -> Option<String> {
    path.as_ref()
        .map(|path| std::fs::read_to_string(path).expect("the ZooKeeper CA file"))
}

/// `CLOUDTASK_ZOOKEEPER_TLS_CA` for a process, when there is a CA.
fn tls_ca_env(path: &Option<std::path::PathBuf>) -> Vec<(&'static str, std::path::PathBuf)> {
    path.iter()
        .map(|path| ("CLOUDTASK_ZOOKEEPER_TLS_CA", path.clone()))
        .collect()
}

/// A fresh `run_dir` for workers: a temporary folder others may enter (tasks of a root
/// worker run as other users, who must reach their folders in it).
pub fn run_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cloudtask-runs-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

/// A temporary folder a test shares with its tasks (which a root worker runs as other
/// users): anyone may create files in it (sticky, like /tmp).
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

pub fn at(run: &Value, field: &str) -> DateTime<Utc> {
    run[field].as_str().unwrap().parse().unwrap()
}

pub fn status(run: &Value) -> &str {
    run["status"].as_str().unwrap()
}

/// The exactly-once ledger of a task that fires every `period`: (fire, attempt) pairs
/// recorded twice, and fires between the first record and the last that have none.
pub fn ledger_counts(runs: &[Value], period: chrono::Duration) -> (usize, i64) {
    let mut keys: Vec<(DateTime<Utc>, u64)> = runs
        .iter()
        .map(|r| (at(r, "scheduledAt"), r["attempt"].as_u64().unwrap()))
        .collect();
    keys.sort();
    let total = keys.len();
    keys.dedup();
    let duplicates = total - keys.len();
    let fires: Vec<DateTime<Utc>> = keys
        .iter()
        .filter(|(_, attempt)| *attempt == 0)
        .map(|(t, _)| *t)
        .collect();
    let unaccounted: i64 = fires
        .windows(2)
        .map(|pair| ((pair[1] - pair[0]).num_milliseconds() / period.num_milliseconds()) - 1)
        .sum();
    (duplicates, unaccounted)
}

pub fn ledger(runs: &[Value], period: chrono::Duration) {
    assert_eq!(
        ledger_counts(runs, period),
        (0, 0),
        "duplicates and unaccounted fires: {runs:#?}"
    );
}

/// Polls `node` until it exists (`present`) or is gone, for at most `bound`.
pub async fn until_node(
    observer: &dyn cloudtask_coord::Session,
    node: &str,
    present: bool,
    bound: Duration,
) {
    let since = tokio::time::Instant::now();
    while observer.get(node).await.unwrap().is_some() != present {
        assert!(
            since.elapsed() < bound,
            "{node} still {} after {bound:?}",
            if present { "absent" } else { "present" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
