//! Coordination under failure, with real processes: a worker frozen past its session
//! timeout, the ZooKeeper server restarted under load, the scheduler leader killed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use cloudtask_coord::{Coordinator, layout};
use cloudtask_testkit::PrivateZooKeeper;
use serde_json::{Value, json};

use crate::harness::{Cluster, Options, at, ledger, status, until_node};

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// The cluster's workers as the API shows them: name → (online, startedAt).
async fn workers(cluster: &Cluster) -> BTreeMap<String, (bool, Option<String>)> {
    let response = cluster
        .owner
        .run(
            "query($id: ID!) { cluster(id: $id) { workers { name online startedAt } } }",
            json!({ "id": cluster.cluster_id }),
        )
        .await;
    response.data()["cluster"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_owned(),
                (
                    w["online"].as_bool().unwrap(),
                    w["startedAt"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_worker_frozen_past_its_session_timeout_comes_back_without_acting_on_stale_assignments() {
    let mut cluster = Cluster::start().await;
    let w1 = cluster.spawn_worker_process("w1");
    let w2 = cluster.spawn_worker_process("w2");
    let task = cluster
        .create_task(
            json!({ "name": "ticking", "schedule": "* * * * * *", "command": "echo tick" }),
        )
        .await;
    cluster
        .runs_until(&task, "a first success", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    let owner = cluster.assigned_worker(&task).await.expect("an owner");
    let (frozen, survivor) = if owner == "w1" {
        (w1, "w2")
    } else {
        (w2, "w1")
    };
    let pid = cluster.processes[frozen].id();

    signal(pid, "STOP");
    let stopped_at = Utc::now();
    // Its session expires: the task moves to the survivor and keeps firing there.
    wait_for("the task to move", Duration::from_secs(30), async || {
        cluster.assigned_worker(&task).await.as_deref() == Some(survivor)
    })
    .await;
    cluster
        .runs_until(&task, "a run on the survivor", |runs| {
            runs.iter()
                .any(|r| r["worker"] == survivor && status(r) == "SUCCEEDED")
        })
        .await;

    wait_for(
        "the frozen worker to be seen offline",
        Duration::from_secs(30),
        async || {
            !workers(&cluster)
                .await
                .get(&owner)
                .is_some_and(|(online, _)| *online)
        },
    )
    .await;

    signal(pid, "CONT");
    // It notices its session ended, drops everything, and registers again.
    wait_for(
        "the frozen worker to register again",
        Duration::from_secs(30),
        async || {
            workers(&cluster)
                .await
                .get(&owner)
                .is_some_and(|(online, _)| *online)
        },
    )
    .await;
    // Both changes are events for the operators, in the audit log (and the outbox).
    wait_for(
        "the offline and online events",
        Duration::from_secs(30),
        async || {
            let log = cluster
                .owner
                .run(
                    "{ auditLog(first: 200) { edges { node { operation objectId } } } }",
                    json!({}),
                )
                .await;
            let ops: Vec<(String, String)> = log.data()["auditLog"]["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["node"]["operation"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        e["node"]["objectId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    )
                })
                .collect();
            ["workerOffline", "workerOnline"].iter().all(|op| {
                ops.iter()
                    .any(|(o, id)| o == op && id.ends_with(&format!("/{owner}")))
            })
        },
    )
    .await;
    let back_at = Utc::now();
    cluster
        .runs_until(&task, "two more seconds of runs", |runs| {
            runs.iter()
                .any(|r| at(r, "scheduledAt") > back_at + chrono::Duration::seconds(2))
        })
        .await;
    let runs = cluster.pause_and_settle(&task, 1).await;
    ledger(&runs, chrono::Duration::seconds(1));
    // After the freeze the stale owner started nothing (it may have recorded fires of
    // its freeze as misfires, racing the survivor for them; one record per fire either way).
    let stale: Vec<&Value> = runs
        .iter()
        .filter(|r| r["worker"] == owner.as_str() && at(r, "scheduledAt") > stopped_at)
        .filter(|r| !matches!(status(r), "LOST" | "SKIPPED"))
        .collect();
    assert!(stale.is_empty(), "the frozen worker acted: {stale:#?}");
}

#[tokio::test]
async fn a_zookeeper_restart_under_load_moves_nothing_and_loses_no_fire() {
    let mut zookeeper = PrivateZooKeeper::start().await;
    let chroot = format!("/cloudtask_test_{}", uuid::Uuid::new_v4().simple());
    let mut cluster = Cluster::start_with(Options {
        zookeeper: Some(zookeeper.connect_string(&chroot)),
        session_timeout: Duration::from_secs(15),
        ..Options::default()
    })
    .await;
    cluster.spawn_worker_process("w1");
    cluster.spawn_worker_process("w2");
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(
            cluster
                .create_task(json!({ "name": format!("load-{i}"), "schedule": "*/2 * * * * *", "command": "echo load" }))
                .await,
        );
    }
    let mut owners = BTreeMap::new();
    for task in &tasks {
        cluster
            .runs_until(task, "a first success", |runs| {
                runs.iter().any(|r| status(r) == "SUCCEEDED")
            })
            .await;
        owners.insert(task.clone(), cluster.assigned_worker(task).await);
    }
    assert!(owners.values().all(Option::is_some), "{owners:?}");

    // A crash and restart of the server, shorter than the session timeout: sessions
    // resume, nothing is reallocated.
    zookeeper.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    zookeeper.restart().await;
    let back_at = Utc::now();
    for task in &tasks {
        cluster
            .runs_until(task, "runs after the restart", |runs| {
                runs.iter().any(|r| {
                    at(r, "scheduledAt") > back_at + chrono::Duration::seconds(2)
                        && status(r) == "SUCCEEDED"
                })
            })
            .await;
    }
    for task in &tasks {
        assert_eq!(
            cluster.assigned_worker(task).await,
            owners[task],
            "task {task} moved"
        );
    }
    for task in &tasks {
        let runs = cluster.pause_and_settle(task, 2).await;
        ledger(&runs, chrono::Duration::seconds(2));
    }
}

#[tokio::test]
async fn killing_the_leading_scheduler_hands_over_within_the_session_timeout_moving_nothing() {
    let session_timeout = Duration::from_secs(4);
    let mut cluster = Cluster::start_with(Options {
        in_process_scheduler: false,
        session_timeout,
        ..Options::default()
    })
    .await;
    let schedulers = [
        cluster.spawn_scheduler_process("s1"),
        cluster.spawn_scheduler_process("s2"),
    ];
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(
            cluster
                .create_task(
                    json!({ "name": format!("t-{i}"), "schedule": "0 0 1 1 *", "command": "true" }),
                )
                .await,
        );
    }
    let mut owners = BTreeMap::new();
    for task in &tasks {
        wait_for("an assignment", Duration::from_secs(30), async || {
            cluster.assigned_worker(task).await.is_some()
        })
        .await;
        owners.insert(task.clone(), cluster.assigned_worker(task).await);
    }

    // The leader is the lowest election node; its payload names the process.
    let observer = cluster.observer().connect().await.unwrap();
    let election = layout::by_sequence(observer.children(layout::ELECTION).await.unwrap());
    assert_eq!(election.len(), 2, "both schedulers campaign");
    let leader = observer
        .get(&layout::join(layout::ELECTION, &election[0]))
        .await
        .unwrap()
        .unwrap();
    let leader_pid: u32 = String::from_utf8(leader.data)
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let index = schedulers
        .iter()
        .position(|i| cluster.processes[*i].id() == leader_pid)
        .expect("the leader is one of ours");
    let killed = std::time::Instant::now();
    cluster.processes[schedulers[index]].kill().unwrap();

    // The standby leads: it proves it by assigning a new task.
    let extra = cluster
        .create_task(json!({ "name": "extra", "schedule": "0 0 1 1 *", "command": "true" }))
        .await;
    wait_for(
        "the standby to assign a new task",
        Duration::from_secs(30),
        async || cluster.assigned_worker(&extra).await.is_some(),
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= session_timeout * 2,
        "the standby took {took:?} to lead (session timeout {session_timeout:?})"
    );
    for task in &tasks {
        assert_eq!(
            cluster.assigned_worker(task).await,
            owners[task],
            "task {task} moved"
        );
    }
}

#[tokio::test]
async fn kill_9_of_a_worker_process_moves_exactly_its_tasks_to_the_survivors() {
    let mut cluster = Cluster::start().await;
    let mut processes = BTreeMap::new();
    for name in ["w1", "w2", "w3"] {
        processes.insert(name, cluster.spawn_worker_process(name));
    }
    wait_for(
        "three workers online",
        Duration::from_secs(30),
        async || {
            workers(&cluster)
                .await
                .values()
                .filter(|(online, _)| *online)
                .count()
                == 3
        },
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(
            cluster
                .create_task(
                    json!({ "name": format!("t-{i}"), "schedule": "0 0 1 1 *", "command": "true" }),
                )
                .await,
        );
    }
    let mut before = BTreeMap::new();
    for task in &tasks {
        wait_for("an assignment", Duration::from_secs(30), async || {
            cluster.assigned_worker(task).await.is_some()
        })
        .await;
        before.insert(task.clone(), cluster.assigned_worker(task).await.unwrap());
    }
    let victim = before.values().next().unwrap().clone();
    let index = processes[victim.as_str()];
    cluster.processes[index].kill().unwrap();
    cluster.processes[index].wait().unwrap();

    let mut after = BTreeMap::new();
    wait_for(
        "the victim's tasks to move",
        Duration::from_secs(30),
        async || {
            after.clear();
            for task in &tasks {
                after.insert(task.clone(), cluster.assigned_worker(task).await);
            }
            after
                .values()
                .all(|o| o.as_ref().is_some_and(|o| *o != victim))
        },
    )
    .await;
    for (task, owner) in &before {
        let now = after[task].as_ref().unwrap();
        if *owner == victim {
            assert_ne!(*now, victim);
        } else {
            assert_eq!(now, owner, "task {task} of a survivor moved");
        }
    }
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped: it runs nothing).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_worker_cut_off_from_zookeeper_stops_its_run_before_its_session_expires() {
    let session_timeout = Duration::from_secs(6);
    let (cluster, proxy) = cluster_with_a_cuttable_worker(session_timeout).await;
    let pids = crate::harness::shared_dir();
    let pids = pids.path();
    // The whole group ignores SIGTERM: only the kill after the grace ends it.
    let task = cluster
        .create_task(json!({
            "name": "long",
            "schedule": "0 0 1 1 *",
            "command": format!(
                "trap '' TERM; echo $$ > {}/$CLOUDTASK_RUN_ID; exec sleep 600",
                pids.display()
            ),
        }))
        .await;
    cluster.wait_assigned(&task).await;
    let run = cluster.run_now(&task).await;
    let pid_file = pids.join(&run);
    let started = tokio::time::Instant::now();
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let observer = cluster.observer().connect().await.unwrap();
    let node = layout::worker(cluster.cluster_id.parse().unwrap(), &"w1".parse().unwrap());
    assert!(observer.get(&node).await.unwrap().is_some());
    proxy.cut();
    // The server expires the session; by then the run's process must be gone.
    until_node(observer.as_ref(), &node, false, session_timeout * 3).await;
    assert!(
        gone(pid),
        "the run's process {pid} outlived the session of its cut-off worker"
    );
    // Reported by the worker itself (the API is reachable): lost for the fence, not a
    // user's stop.
    let runs = cluster
        .runs_until(&task, "the run to end", |runs| {
            runs.iter()
                .any(|r| r["id"] == run.as_str() && r["finishedAt"].is_string())
        })
        .await;
    let ended = runs.iter().find(|r| r["id"] == run.as_str()).unwrap();
    assert_eq!(
        (status(ended), ended["reason"].as_str()),
        ("LOST", Some("FENCED")),
        "{ended:#?}"
    );

    // Back on the network, it registers again on a new session.
    proxy.restore();
    until_node(observer.as_ref(), &node, true, session_timeout * 3).await;
}

/// A cluster whose one worker process, `w1`, reaches ZooKeeper through a proxy that can
/// cut it off (the API stays reachable).
async fn cluster_with_a_cuttable_worker(
    session_timeout: Duration,
) -> (Cluster, cloudtask_testkit::Proxy) {
    let mut cluster = Cluster::start_with(Options {
        session_timeout,
        ..Options::default()
    })
    .await;
    let (server, chroot) = cluster
        .zookeeper
        .split_at(cluster.zookeeper.find('/').expect("a chroot"));
    let proxy = cloudtask_testkit::Proxy::start(server).await;
    let via = format!("{}{chroot}", proxy.addr);
    cluster.spawn_worker_process_via("w1", &via);
    (cluster, proxy)
}

#[tokio::test]
async fn a_worker_fenced_off_then_back_on_its_session_fires_on_once_per_fire_time() {
    let session_timeout = Duration::from_secs(8);
    let (cluster, proxy) = cluster_with_a_cuttable_worker(session_timeout).await;
    let task = cluster
        .create_task(json!({ "name": "tick", "schedule": "*/3 * * * * *", "command": "echo tick" }))
        .await;
    cluster
        .runs_until(&task, "a first success", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    // Cut for a little longer than the fence delay (a fifth of the timeout), far shorter
    // than the session: the worker drops the task, then the same session comes back
    // with it while fires it had planned are still ahead.
    proxy.cut();
    tokio::time::sleep(session_timeout / 5 + Duration::from_millis(400)).await; // the outage
    proxy.restore();
    let back_at = Utc::now();
    cluster
        .runs_until(&task, "successes after the outage", |runs| {
            runs.iter()
                .filter(|r| {
                    at(r, "scheduledAt") > back_at + chrono::Duration::seconds(2)
                        && status(r) == "SUCCEEDED"
                })
                .count()
                >= 3
        })
        .await;
    assert_eq!(
        cluster.assigned_worker(&task).await.as_deref(),
        Some("w1"),
        "the session lived on: nothing moved"
    );
    let runs = cluster.pause_and_settle(&task, 3).await;
    ledger(&runs, chrono::Duration::seconds(3));
}
