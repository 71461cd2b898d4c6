//! A task's processes end with its run, and its limits hold, on a real worker: tenants'
//! tasks that leave their process group every way a shell can (`setsid`, a double fork,
//! `nohup`), ignore SIGTERM, eat memory or fork without end. Checked in `/proc`. Needs a
//! machine where the worker can make cgroups (root, with v1 controllers or v2): without
//! one, the tests that need them say so and skip.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};

use crate::harness::{Cluster, at, status};

/// The grace the in-process workers of the harness give (SIGTERM → SIGKILL).
const GRACE: Duration = Duration::from_secs(1);

/// Whether this machine lets a worker hold runs in cgroups; says why not when it does not.
fn cgroups_here() -> bool {
    use cloudtask_worker::exec::{Containment, ContainmentMode};
    let data = tempfile::tempdir().unwrap();
    let containment = Containment::detect(ContainmentMode::Auto, data.path());
    let usable = containment.uses_cgroups();
    containment.close();
    if !usable {
        eprintln!(
            "SKIPPED: this machine gives the worker no cgroups (needs root and cgroup v1 controllers or v2)"
        );
    }
    usable
}

/// A command that starts three daemons, each ignoring SIGTERM and recording its pid in
/// `pids/<run>-<kind>`, then waits.
fn daemons(pids: &Path) -> String {
    let dir = pids.display();
    let daemon = |kind: &str| {
        format!("sh -c 'trap \"\" TERM; echo $$ > {dir}/$CLOUDTASK_RUN_ID-{kind}; exec sleep 600'")
    };
    format!(
        "setsid {setsid} & ({double} &) ; nohup {nohup} >/dev/null 2>&1 & echo up; sleep 600",
        setsid = daemon("setsid"),
        double = daemon("double"),
        nohup = daemon("nohup"),
    )
}

/// The daemons' pids once all three have written them (bounded).
async fn daemon_pids(pids: &Path, run: &str) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read: Vec<u32> = ["setsid", "double", "nohup"]
            .iter()
            .filter_map(|kind| {
                std::fs::read_to_string(pids.join(format!("{run}-{kind}")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect();
        if read.len() == 3 && read.iter().all(|&p| alive(p)) {
            return read;
        }
        assert!(Instant::now() < deadline, "the daemons never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a process that has not ended (a zombie has).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// How long after `since` every one of `pids` had ended; fails past `limit`.
async fn all_gone(pids: &[u32], since: Instant, limit: Duration, what: &str) -> Duration {
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return since.elapsed();
        }
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            since.elapsed() <= limit,
            "{what}: daemons {left:?} still alive after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run_of(cluster: &Cluster, task: &str, run: &str) -> Value {
    cluster
        .runs(task)
        .await
        .into_iter()
        .find(|r| r["id"] == run)
        .expect("the run")
}

/// Where the daemons write their pids: a folder the run's own user may write in (a root
/// worker runs tasks as an unprivileged user).
fn pid_dir() -> tempfile::TempDir {
    crate::harness::shared_dir()
}

#[tokio::test]
async fn daemons_that_leave_their_group_end_within_the_grace_of_a_stop_and_of_a_timeout() {
    if !cgroups_here() {
        return;
    }
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let pids_dir = pid_dir();
    let pids = pids_dir.path().to_path_buf();
    let stopped = cluster
        .create_task(json!({
            "name": "daemons-stopped",
            "schedule": "0 0 1 1 *",
            "command": daemons(&pids),
        }))
        .await;
    let timed = cluster
        .create_task(json!({
            "name": "daemons-timed-out",
            "schedule": "0 0 1 1 *",
            "timeoutSeconds": 3,
            "command": daemons(&pids),
        }))
        .await;
    cluster.wait_assigned(&stopped).await;
    cluster.wait_assigned(&timed).await;

    // Stop.
    let run = cluster.run_now(&stopped).await;
    let daemons_of_stop = daemon_pids(&pids, &run).await;
    let asked = Instant::now();
    let stop = cluster
        .owner
        .run(
            "mutation($id: ID!) { stopRun(id: $id) { id } }",
            json!({ "id": run }),
        )
        .await;
    assert_eq!(stop.data()["stopRun"]["id"], run.as_str(), "{}", stop.body);
    let took = all_gone(
        &daemons_of_stop,
        asked,
        GRACE + Duration::from_secs(1),
        "stop",
    )
    .await;
    eprintln!("stop: every daemon gone {took:?} after stopRun (grace {GRACE:?})");
    cluster
        .runs_until(&stopped, "the run to be STOPPED", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) == "STOPPED")
        })
        .await;

    // Timeout.
    let run = cluster.run_now(&timed).await;
    let daemons_of_timeout = daemon_pids(&pids, &run).await;
    let started = run_of(&cluster, &timed, &run).await;
    let started_at = at(&started, "startedAt");
    let now = Instant::now();
    let since_start = (Utc::now() - started_at).to_std().unwrap_or_default();
    let start = now.checked_sub(since_start).unwrap_or(now);
    let limit = Duration::from_secs(3) + GRACE + Duration::from_secs(1);
    let took = all_gone(&daemons_of_timeout, start, limit, "timeout").await;
    eprintln!("timeout: every daemon gone {took:?} after the start (timeout 3 s, grace {GRACE:?})");
    let runs = cluster
        .runs_until(&timed, "the run to be TIMED_OUT", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) == "TIMED_OUT")
        })
        .await;
    let ended = runs.iter().find(|r| r["id"] == run).unwrap();
    // Its end is recorded when it happened, not when a daemon happened to die.
    let recorded = at(ended, "finishedAt") - started_at;
    assert!(
        recorded < chrono::Duration::seconds(6),
        "recorded as ending {recorded} after its start"
    );
}

/// `cloudtask worker` as a process, with its own kill grace, on `data`.
fn worker_process(
    cluster: &Cluster,
    name: &str,
    data: &Path,
    grace_secs: u64,
) -> std::process::Child {
    std::fs::create_dir_all(data).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("worker.log"))
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_cloudtask"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLOUDTASK_API_URL", cluster.worker_api_url())
        .env("CLOUDTASK_ZOOKEEPER", &cluster.zookeeper)
        .env(
            "CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT_MS",
            cluster.session_timeout.as_millis().to_string(),
        )
        .env("CLOUDTASK_CLUSTER_TOKEN", &cluster.join_token)
        .env("CLOUDTASK_WORKER_NAME", name)
        .env("CLOUDTASK_DATA_DIR", data)
        .env("CLOUDTASK_RUN_KILL_GRACE_SECS", grace_secs.to_string())
        .env("CLOUDTASK_LOG_LEVEL", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the worker binary")
}

/// Waits (bounded) for the process to exit; how long it took.
async fn exited(child: &mut std::process::Child, within: Duration, what: &str) -> Duration {
    let since = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() <= within,
            "{what} did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_worker_shut_down_or_crashed_leaves_no_daemon_of_its_runs() {
    if !cgroups_here() {
        return;
    }
    let cluster = Cluster::start().await;
    let pids_dir = pid_dir();
    let pids = pids_dir.path().to_path_buf();
    let data = cluster.data.path().join("w1");
    let grace = Duration::from_secs(3);
    let mut worker = worker_process(&cluster, "w1", &data, grace.as_secs());
    let task = cluster
        .create_task(json!({
            "name": "daemons",
            "schedule": "0 0 1 1 *",
            "command": daemons(&pids),
        }))
        .await;
    cluster.wait_assigned(&task).await;

    // SIGTERM with daemons running: the worker stops its run and exits within the grace.
    let run = cluster.run_now(&task).await;
    let running = daemon_pids(&pids, &run).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The grace, and a few seconds for the worker to report and leave (its daemons would
    // hold it forever; the report goes to an API that may be busy with the rest of the
    // suite: CI once saw more than one second).
    let took = exited(&mut worker, grace + Duration::from_secs(3), "the worker").await;
    eprintln!("SIGTERM: the worker exited {took:?} after it (grace {grace:?})");
    assert!(
        running.iter().all(|&p| !alive(p)),
        "a daemon outlived its worker"
    );
    // Ended by the worker's shutdown, not a user: LOST, with the cause.
    cluster
        .runs_until(&task, "the run to be LOST for the shutdown", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) == "LOST" && r["reason"] == "SHUTDOWN")
        })
        .await;

    // Crash (SIGKILL) with daemons running: they survive the worker, and the next worker
    // on the same data folder ends them as it starts.
    let mut worker = worker_process(&cluster, "w1", &data, grace.as_secs());
    cluster.wait_assigned(&task).await;
    let run = cluster.run_now(&task).await;
    let left = daemon_pids(&pids, &run).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert!(
        left.iter().all(|&p| alive(p)),
        "nothing was left to clean up"
    );
    let restarted = Instant::now();
    let mut worker = worker_process(&cluster, "w1", &data, grace.as_secs());
    let took = all_gone(&left, restarted, Duration::from_secs(20), "restart").await;
    eprintln!("crash: the restarted worker ended the leftover daemons {took:?} after its start");
    // A clean exit removes the worker's cgroups and its record of them.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    exited(
        &mut worker,
        grace + Duration::from_secs(1),
        "the restarted worker",
    )
    .await;
    assert!(
        !data.join("cgroups").exists(),
        "the worker's cgroups are still recorded"
    );
}

#[tokio::test]
async fn limits_end_a_memory_hog_and_hold_a_fork_bomb_while_the_worker_runs_others() {
    if !cgroups_here() {
        return;
    }
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    // Cluster defaults, and a task's own limit over them.
    let set = cluster
        .owner
        .run(
            "mutation($id: ID!) { setClusterLimits(id: $id, limits: { memoryMb: 64, maxProcesses: 64 }) {
                defaultLimits { memoryMb maxProcesses cpuMillis } } }",
            json!({ "id": cluster.cluster_id }),
        )
        .await;
    assert_eq!(
        set.data()["setClusterLimits"]["defaultLimits"],
        json!({ "memoryMb": 64, "maxProcesses": 64, "cpuMillis": null }),
        "{}",
        set.body
    );
    let hog = cluster
        .create_task(json!({
            "name": "hog",
            "schedule": "0 0 1 1 *",
            // `tail` holds a line it has not finished: this one never ends.
            "command": "head -c 1000000000 /dev/zero | tail -n 1 | wc -c",
        }))
        .await;
    let bomb = cluster
        .create_task(json!({
            "name": "bomb",
            "schedule": "0 0 1 1 *",
            "timeoutSeconds": 20,
            "limits": { "maxProcesses": 20, "cpuMillis": 200 },
            // The classic bomb, in bash, which retries a refused fork rather than die (so
            // it presses on the limit the whole time); the run's shell forks its sleeper
            // first (at the limit its own forks would fail too) and then only waits.
            "command": "exec 2>/dev/null; sleep 4 & bash -c 'f() { f | f & }; f' & wait",
        }))
        .await;
    let fine = cluster
        .create_task(json!({
            "name": "fine",
            "schedule": "0 0 1 1 *",
            "command": "echo alive",
        }))
        .await;
    let task = cluster
        .owner
        .run(
            "query($id: ID!) { task(id: $id) { limits { maxProcesses memoryMb } } }",
            json!({ "id": bomb }),
        )
        .await;
    assert_eq!(
        task.data()["task"]["limits"],
        json!({ "maxProcesses": 20, "memoryMb": null })
    );
    for t in [&hog, &bomb, &fine] {
        cluster.wait_assigned(t).await;
    }

    let run = cluster.run_now(&hog).await;
    let runs = cluster
        .runs_until(&hog, "the hog to end", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) != "RUNNING" && status(r) != "QUEUED")
        })
        .await;
    let ended = reason_of(&cluster, &run).await;
    let hog_run = runs.iter().find(|r| r["id"] == run).unwrap();
    assert_eq!(status(hog_run), "FAILED", "{hog_run:#}");
    assert_eq!(ended, "OOM_KILLED", "{hog_run:#}");
    assert!(
        hog_run["logs"].as_array().unwrap().iter().any(
            |l| l["stream"] == "SYSTEM" && l["text"].as_str().unwrap().contains("memory limit")
        ),
        "{hog_run:#}"
    );

    // The bomb: never more processes than its limit, and the worker runs another task
    // meanwhile.
    let run = cluster.run_now(&bomb).await;
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(carrying(&run));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most <= 20, "{most} processes for a limit of 20");
    assert!(
        most >= 10,
        "the bomb never came near its limit: {most} processes; {:#?}",
        cluster.runs(&bomb).await
    );
    let other = cluster.run_now(&fine).await;
    cluster
        .runs_until(&fine, "another task to run beside the bomb", |runs| {
            runs.iter()
                .any(|r| r["id"] == other && status(r) == "SUCCEEDED")
        })
        .await;
    let runs = cluster
        .runs_until(&bomb, "the bomb to end", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) != "RUNNING" && status(r) != "QUEUED")
        })
        .await;
    let bomb_run = runs.iter().find(|r| r["id"] == run).unwrap();
    assert!(
        matches!(status(bomb_run), "FAILED" | "TIMED_OUT"),
        "{bomb_run:#}"
    );
    assert_eq!(
        reason_of(&cluster, &run).await,
        "PIDS_LIMIT",
        "{bomb_run:#}"
    );
    assert_eq!(carrying(&run), 0, "processes of the bomb outlived its run");
    eprintln!(
        "fork bomb: at most {most} processes seen, ended {}",
        status(bomb_run)
    );

    // The worker says how it holds runs.
    let containment = containment_of(&cluster).await;
    assert!(containment.starts_with("cgroup-"), "{containment}");
}

/// `Worker.containment` of the cluster's first worker.
async fn containment_of(cluster: &Cluster) -> String {
    let workers = cluster
        .owner
        .run(
            "query($id: ID!) { cluster(id: $id) { workers { containment } } }",
            json!({ "id": cluster.cluster_id }),
        )
        .await;
    workers.data()["cluster"]["workers"][0]["containment"]
        .as_str()
        .unwrap_or_else(|| panic!("no containment: {}", workers.body))
        .to_owned()
}

/// `Run.reason` of a run.
async fn reason_of(cluster: &Cluster, run: &str) -> String {
    let answer = cluster
        .owner
        .run(
            "query($id: ID!) { run(id: $id) { reason } }",
            json!({ "id": run }),
        )
        .await;
    answer.data()["run"]["reason"]
        .as_str()
        .unwrap_or("null")
        .to_owned()
}

/// Live processes carrying the run's id in their environment.
fn carrying(run: &str) -> usize {
    let marker = format!("CLOUDTASK_RUN_ID={run}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            alive(pid)
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        })
        .count()
}

/// Where no cgroup holds a run (a worker that is not root, or told `process-tree`), the
/// worker holds the run's memory and process limits itself: it samples the run's
/// processes and kills a run over either, which ends FAILED with its reason. Runs on any
/// machine.
#[tokio::test]
async fn a_process_tree_worker_ends_a_run_over_its_memory_or_process_limit() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker_with(
        "w1",
        std::sync::Arc::new(cloudtask_worker::clock::SystemClock),
        |config| config.containment = "process-tree".into(),
    );
    let hog = cluster
        .create_task(json!({
            "name": "hog",
            "schedule": "0 0 1 1 *",
            "limits": { "memoryMb": 64 },
            // `tail` holds a line it has not finished: it grows until it is killed.
            "command": "head -c 4000000000 /dev/zero | tail -n 1 | wc -c; echo survived",
        }))
        .await;
    let crowd = cluster
        .create_task(json!({
            "name": "crowd",
            "schedule": "0 0 1 1 *",
            "limits": { "maxProcesses": 10 },
            // 40 sleepers, three of them out of the run's group and session.
            "command": "for i in $(seq 37); do sleep 30 & done; setsid sleep 31 & nohup sleep 32 >/dev/null & (setsid sleep 33 &) ; wait; echo survived",
        }))
        .await;
    let fine = cluster
        .create_task(json!({
            "name": "fine",
            "schedule": "0 0 1 1 *",
            "limits": { "memoryMb": 64, "maxProcesses": 10 },
            "command": "echo alive",
        }))
        .await;
    for t in [&hog, &crowd, &fine] {
        cluster.wait_assigned(t).await;
    }

    for (task, reason, what) in [
        (&hog, "OOM_KILLED", "memory limit"),
        (&crowd, "PIDS_LIMIT", "process limit"),
    ] {
        let run = cluster.run_now(task).await;
        let runs = cluster
            .runs_until(task, "the run over its limit to end", |runs| {
                runs.iter()
                    .any(|r| r["id"] == run && status(r) != "RUNNING" && status(r) != "QUEUED")
            })
            .await;
        let ended = runs.iter().find(|r| r["id"] == run).unwrap();
        assert_eq!(status(ended), "FAILED", "{ended:#}");
        assert_eq!(reason_of(&cluster, &run).await, reason, "{ended:#}");
        let logs = ended["logs"].as_array().unwrap();
        assert!(
            logs.iter()
                .any(|l| l["stream"] == "SYSTEM" && l["text"].as_str().unwrap().contains(what)),
            "{ended:#}"
        );
        assert!(
            !logs.iter().any(|l| l["text"] == "survived"),
            "the command went on after its limit: {ended:#}"
        );
        assert_eq!(carrying(&run), 0, "processes of {task} outlived its run");
    }

    // A run within its limits is untouched.
    let run = cluster.run_now(&fine).await;
    cluster
        .runs_until(&fine, "a run within its limits to succeed", |runs| {
            runs.iter()
                .any(|r| r["id"] == run && status(r) == "SUCCEEDED")
        })
        .await;

    let containment = containment_of(&cluster).await;
    assert!(containment.starts_with("process-tree"), "{containment}");
}
